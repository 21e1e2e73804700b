"""layerwise: layerwise-adaptive optimizers (LAMB, LARS, ...) written as text programs.

Public API (LANGUAGE.md section 8)::

    import layerwise as lw
    spec = lw.load("lamb")
    spec = lw.parse(text, filename="my.lw")
    spec = spec.override("def phi(z) = clip(z, 0.01, 10)")
    opt = lw.Optimizer(model.named_parameters(), spec, lr=2e-3)
    opt = lw.adapt(torch.optim.AdamW(model.parameters()), "trust")
    lw.presets()
"""
from .errors import SpecError
from .optimizer import Optimizer
from .spec import Spec, load, parse, presets
from .adapt import adapt
from .convert import convert_state_dict

__all__ = ["SpecError", "Spec", "Optimizer", "adapt", "convert_state_dict", "load", "parse",
           "presets"]
__version__ = "0.1.0"
