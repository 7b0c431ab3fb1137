"""The cost model: time and memory of blocks, stages and steps, from the proxy graph and
the cluster.

One job per module: ``collectives`` (alpha-beta times of collectives and p2p),
``blocks`` (:func:`block_costs`: one block, one device, one microbatch), ``stages``
(:func:`stage_costs`: a stage's blocks summed with its p2p, data-parallel tail and static
memory), ``step`` (:func:`step_estimate`: stage costs, schedule and simulation of one
step).

Conventions (all per device, per microbatch unless said otherwise):

* **Batch.** The graph is annotated for ``graph.batch_size`` samples; FLOPs
  and activation bytes scale linearly to the microbatch size ``b``
  (factor ``b / graph.batch_size``), and so does the token dimension ``m``
  of each matrix product (which moves its efficiency).
* **Dtype.** The graph is usually annotated in fp32 on the meta device. The
  training dtype (``dtype``; by default the device's: bf16 on GPUs, fp32
  on CPUs) sets the peak FLOP/s used and the bytes: every activation byte of
  the graph is multiplied by ``bytes(train dtype) / bytes(graph dtype)``
  (bf16 from an fp32 graph: x 1/2). Parameters are counted, not read from
  the graph's bytes.
* **Compute.** Each forward product (m, k, n) runs at
  ``peak x Efficiency.matmul(m, k, n)``; FLOPs the block has beyond its listed
  products (attention kernels) run at the efficiency of its products
  (weighted by FLOPs), plus ``launch_s`` per product and pass. Non-matmul kernels are
  memory-bound: a forward moves ``memory_traffic x saved bytes`` at ``memory x
  bandwidth``, the backward twice that. Every tensor operator (``Block.ops``) also
  pays ``op_s`` in the forward and again in the backward (B): dispatch, autograd and
  Python, which a CPU process runs on its critical path (0 on GPUs). A calibrated CPU
  profile scales a block's forward by ``block_forward`` and its backward by
  ``block_backward`` (whole blocks timed against this sum; 1 elsewhere; collectives are
  not scaled), and, when the plan has more than one device, by ``node_sharing`` (the
  node's processes share its caches and memory bandwidth). The backward FLOPs split
  into the weight gradient
  ``W = min(backward / 2, 2 x tokens x params)`` (a linear's dW = 2 m k n)
  and the input gradient ``B = backward - W``; the memory-bound part and the
  tensor-parallel backward collectives go to B, gradient accumulation
  (read + write the gradient) to W.
* **Tensor parallelism.** A block with a region proven at degree t runs
  its FLOPs / t and pays the regions' collectives (ring, inside a node
  when t <= devices per node). Its parameters are divided by t. Its saved
  bytes follow Korthikanti et al.'s structure ``sbh(10 + 24/t + 5as/(ht))``:
  per attention or MLP region 2.5 block inputs stay replicated (norm input,
  region input, dropout mask), per embedding / LM-head region one; the rest
  is divided by t. With sequence parallelism (``config.sp``) what the token-wise nodes
  between the regions save (``Block.sequence_saved_bytes``: norms, dropouts, residual
  adds, and the entries the column-parallel linears keep) is divided by tp too
  (Korthikanti's ``sbh(34 + 5as/h)/t``), and an attention or MLP region's all-reduce
  (forward and backward) becomes an all-gather plus a reduce-scatter: the same volume.
  The backward all-gathers the entry again for the weight gradient, exposed only where
  the weight gradient does not hide it.
* **Pipeline.** ``send_s`` is latency + bytes / bandwidth of the stage's
  output (inter-node when the next stage sits on another node); with t > 1
  each tensor-parallel rank sends its 1/t slice (Megatron's scatter/gather)
  and the slices are all-gathered inside the node.
* **Data parallelism.** Gradients are all-reduced in buckets while the last
  microbatch's backward runs; what does not fit in that backward (at least
  the last bucket) is exposed and goes to ``tail_s`` with the optimizer step
  (memory-bound, ``optimizer_bytes`` read + written per parameter: 28 for a fused Adam;
  plus ``optimizer_tensor_s`` per parameter tensor, a per-tensor loop's calls; both
  describe Adam, and ``Cluster.with_optimizer`` scales them for another optimizer). ZeRO-1
  reduce-scatters instead and all-gathers the updated parameters after the
  step, and divides the optimizer state by dp.
* **Memory.** Static: weights + gradients + Adam state, 16 bytes per
  parameter in both fp32 and mixed precision (bf16 weights and gradients,
  fp32 master, momentum, variance), the optimizer part (12 or 8 bytes)
  divided by dp under ZeRO-1; plus communication buffers (one gradient
  bucket, p2p send/receive buffers, the largest TP collective). Activations
  per microbatch: the saved bytes; the simulator multiplies them by the
  microbatches in flight.
* **Recompute fraction r** (per stage, 0..1, for schedules without explicit
  R actions): the stage keeps ``r x block inputs + (1 - r) x saved bytes``
  per microbatch and its backward (B) re-runs ``r x`` its forward.
  Schedules with explicit ``f``/``R`` actions instead get the full forward
  as ``recompute_s``, the full saved bytes as ``activation_bytes`` (held
  from R to B: an overestimate, as Megatron re-materialises one layer at a
  time) and every block's input as ``input_bytes`` (held from f to R).
"""

from tripar.partitioner.cost.blocks import BlockCost, block_costs, shardable_regions
from tripar.partitioner.cost.stages import (
    BUCKET_BYTES,
    bytes_per_param,
    optimizer_s_per_param,
    stage_costs,
    uniform_boundaries,
)
from tripar.partitioner.cost.step import StepEstimate, step_estimate
from tripar.partitioner.hardware import ADAM_STEP_BYTES

__all__ = [
    "ADAM_STEP_BYTES",
    "BUCKET_BYTES",
    "BlockCost",
    "StepEstimate",
    "block_costs",
    "bytes_per_param",
    "optimizer_s_per_param",
    "shardable_regions",
    "stage_costs",
    "step_estimate",
    "uniform_boundaries",
]
