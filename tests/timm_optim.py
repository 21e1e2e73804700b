"""timm's optimizers without ``import timm``.

``import timm`` imports torchvision, which does not import beside this
machine's torch build; ``timm/optim/lamb.py`` and ``lars.py`` need only torch
and their siblings ``_helpers`` / ``_types``. This loads ``timm/optim`` as a
package of its own, ``_timm_optim``, so nothing named ``timm`` enters
``sys.modules``. timm is installed without dependencies by scripts/setup.sh.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

_PACKAGE = "_timm_optim"


def timm_optim(module: str) -> types.ModuleType:
    """``timm.optim.<module>`` (``"lamb"``, ``"lars"``) loaded on its own.

    Raises:
        ModuleNotFoundError: timm is not installed.
    """
    if _PACKAGE not in sys.modules:
        spec = importlib.util.find_spec("timm")      # finds, does not import
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("timm is not installed (scripts/setup.sh installs it "
                                      "with --no-deps)")
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [f"{spec.submodule_search_locations[0]}/optim"]
        sys.modules[_PACKAGE] = package
    return importlib.import_module(f"{_PACKAGE}.{module}")
