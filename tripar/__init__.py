"""tripar: automatic data, pipeline and tensor parallelism for PyTorch training."""

from tripar.errors import TriparError

__version__ = "0.1.0"

__all__ = ["TriparError", "__version__"]
