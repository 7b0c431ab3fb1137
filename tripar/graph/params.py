"""Which names a module's parameters go by: one definition of tied weights.

A parameter registered under several FQNs (a tied embedding and LM head) is one tensor.
Its *canonical* name is the first one ``named_parameters`` reaches (registration order);
the others are aliases. :func:`param_groups` lists every parameter's names, canonical
first; :func:`tied_groups` only those with more than one; :func:`canonical_names` maps
each name to its canonical one; :func:`read_params` says which parameters a graph node
reads, by canonical name. The annotation (a tied parameter counted once), the proxy
graph's ``tied_weights``, the tensor-parallel regions' ``tied`` names, codegen's tied
groups across stages and the runtime's aliases all read these.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch.fx
from torch import nn

__all__ = ["canonical_names", "param_groups", "read_params", "tied_groups"]


def param_groups(module: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Every parameter's FQNs, canonical (first registered) first; parameters in
    registration order.

    >>> import torch
    >>> model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(4, 2), "head": torch.nn.Linear(2, 4)})
    >>> model.head.weight = model.emb.weight
    >>> param_groups(model)
    (('emb.weight', 'head.weight'), ('head.bias',))
    """
    names: dict[int, list[str]] = {}
    for fqn, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(fqn)
    return tuple(tuple(group) for group in names.values())


def tied_groups(module: nn.Module) -> tuple[tuple[str, ...], ...]:
    """The FQNs of each parameter known by more than one name, canonical first.

    >>> import torch
    >>> model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(4, 2), "head": torch.nn.Linear(2, 4)})
    >>> model.head.weight = model.emb.weight
    >>> tied_groups(model)
    (('emb.weight', 'head.weight'),)
    """
    return tuple(group for group in param_groups(module) if len(group) > 1)


def canonical_names(module: nn.Module) -> dict[str, str]:
    """Every parameter FQN -> the canonical FQN of its tensor (itself when untied).

    >>> import torch
    >>> model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(4, 2), "head": torch.nn.Linear(2, 4)})
    >>> model.head.weight = model.emb.weight
    >>> canonical_names(model)
    {'emb.weight': 'emb.weight', 'head.weight': 'emb.weight', 'head.bias': 'head.bias'}
    """
    return {fqn: group[0] for group in param_groups(module) for fqn in group}


def read_params(gm: torch.fx.GraphModule, node: torch.fx.Node,
                canon: Mapping[str, str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs ``node`` reads: a ``get_attr`` of a parameter, or every
    parameter of a ``call_module``'s module (each tensor once). Names are canonical when
    ``canon`` (:func:`canonical_names` of ``gm``) is given, else the paths reached.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    >>> [name for name, _ in read_params(gm, next(n for n in gm.graph.nodes if n.op == "call_module"))]
    ['0.weight', '0.bias']
    """
    canon = canon or {}
    if node.op == "get_attr":
        target = str(node.target)
        value = operator.attrgetter(target)(gm)
        return [(canon.get(target, target), value)] if isinstance(value, nn.Parameter) else []
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return [(canon.get(name, name), param)
                for name, param in module.named_parameters(prefix=str(node.target))]
    return []
