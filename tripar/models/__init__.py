"""tripar.models: the parametric model zoo and MODEL spec strings.

``load_model("gpt:layers=2,hidden=64,heads=4,vocab=128,seq=16")`` builds a
model (on the meta device if asked) with an example batch for which
``forward`` returns the loss. The model classes live in the submodules
(``tripar.models.gpt.GPT``, ``tripar.models.llama.Llama``, ...).
"""

from tripar.models.loaded import LoadedModel
from tripar.models.spec import load_model, parse_spec

__all__ = ["LoadedModel", "load_model", "parse_spec"]
