"""Independent NumPy float64 reference implementations of the shipped presets.

Written from the papers and source files each class cites, sharing no code
with the ``layerwise`` package (which is never imported here), so that a
preset and its reference agreeing means something. ``REFERENCES`` maps each
preset name (``presets/NAME.lw``) to its reference class, and ``VARIANTS``
each example of ``examples/variants/NAME.lw`` to its reference class.

Usage::

    params = {"w": np.ones((3, 2))}               # float64, updated in place
    opt = REFERENCES["lamb"](params, lr=1e-2)      # hypers as in the preset
    opt.step({"w": np.full((3, 2), 0.5)})          # None skips a parameter
    opt.watched["tr"]["w"]                         # trust ratio per step
"""
from .adaptations import Trust
from .base import ReferenceOptimizer, l2norm
from .classic import Adam, AdamW, Lion, Sgd
from .lamb_family import Lamb, LambC, NvLamb
from .lars_family import Larc, Lars, LarsLambPaper, TimmLars
from .units import Adafactor, LambRowwise
from .variants import DeepSpeedLamb, KerasLamb, LambNoBiasCorrection, LarsClipped, RAdamLamb

REFERENCES: dict[str, type[ReferenceOptimizer]] = {
    "lamb": Lamb,
    "lambc": LambC,
    "nvlamb": NvLamb,
    "lars": Lars,
    "lars_lamb_paper": LarsLambPaper,
    "larc": Larc,
    "timm_lars": TimmLars,
    "adam": Adam,
    "adamw": AdamW,
    "sgd": Sgd,
    "lion": Lion,
    "adafactor": Adafactor,
    "lamb_rowwise": LambRowwise,
}

#: the examples in examples/variants/ (NAME.lw), each a few declarations on
#: top of a preset (issue 12)
VARIANTS: dict[str, type[ReferenceOptimizer]] = {
    "lamb_no_bias_correction": LambNoBiasCorrection,
    "lamb_keras": KerasLamb,
    "lamb_deepspeed": DeepSpeedLamb,
    "lamb_radam": RAdamLamb,
    "lars_clipped": LarsClipped,
}

#: adaptation presets -> a function of a base reference class giving the
#: reference of that base adapted (LANGUAGE.md section 12)
ADAPTATIONS = {"trust": Trust}

__all__ = ["REFERENCES", "VARIANTS", "ADAPTATIONS", "ReferenceOptimizer", "l2norm", "Adam",
           "AdamW", "Sgd", "Lion", "Lamb", "LambC", "NvLamb", "Lars", "LarsLambPaper", "Larc",
           "Trust", "LambNoBiasCorrection", "KerasLamb", "DeepSpeedLamb", "RAdamLamb",
           "LarsClipped", "Adafactor", "LambRowwise"]
