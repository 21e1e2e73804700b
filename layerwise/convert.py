"""``lw.convert_state_dict``: a torch.optim state dict as a layerwise program's.

Moves a run from ``torch.optim.AdamW`` / ``Adam`` / ``SGD`` to a preset
without losing its moments: their state entries are renamed to the
program's (``exp_avg`` -> ``m``, ``exp_avg_sq`` -> ``v``,
``momentum_buffer`` -> ``buf``) and their param-group options to its hypers
(``betas`` -> ``beta1``, ``beta2``; ``nesterov`` -> 0 or 1). The result
loads with ``lw.Optimizer.load_state_dict``, which checks it whole.
"""
from __future__ import annotations

from typing import Any

import torch

from .spec import Spec, load

__all__ = ["convert_state_dict"]

#: torch.optim state entries -> the presets' state names.
STATE_NAMES = {"exp_avg": "m", "exp_avg_sq": "v", "momentum_buffer": "buf", "step": "step"}

#: torch.optim options that layerwise has no use for (implementation choices).
IGNORED = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")

#: torch.optim options that change the math; converting is refused unless off.
UNSUPPORTED = ("amsgrad", "maximize")


def convert_state_dict(state_dict: dict[str, Any], program: Spec | str) -> dict[str, Any]:
    """``state_dict`` of a torch.optim Adam, AdamW or SGD, as ``program``'s.

    Args:
        state_dict: ``torch.optim.Optimizer.state_dict()`` output (not
            modified: tensors are copied).
        program: the layerwise program (a preset name such as ``"adamw"``,
            a path or a :class:`~layerwise.Spec`) that continues the run;
            its hypers must be named like the torch options (``lr``, ``eps``,
            ``weight_decay``, ``beta1``/``beta2``, ``momentum``,
            ``dampening``, ``nesterov``) and its states ``m``/``v`` or ``buf``.

    Returns:
        A state dict for ``lw.Optimizer(..., program).load_state_dict``:
        the same ``param_groups`` order and parameter ids; per parameter
        ``step`` (a 0-d float tensor; SGD stores none, and a parameter with a
        momentum buffer has stepped, so 1) and the renamed state tensors. A
        parameter with no state, or SGD's ``momentum_buffer=None`` (momentum
        0), gets none: the program starts it afresh, as torch would.

    Raises:
        ValueError: an option that changes the math is on (``amsgrad``,
            ``maximize``), or a state entry has no counterpart in
            ``program`` (naming the parameter id and the key).
    """
    spec = program if isinstance(program, Spec) else load(program)
    states = {s.name for s in spec.program.states}
    groups = []
    for gi, group in enumerate(state_dict["param_groups"]):
        for k in UNSUPPORTED:
            if group.get(k):
                raise ValueError(f"param group {gi}: {k}=True changes the update and no "
                                 f"layerwise program reproduces it; convert a run without it")
        out = {k: v for k, v in group.items() if k not in IGNORED + UNSUPPORTED}
        if "betas" in out:
            out["beta1"], out["beta2"] = (float(b) for b in out["betas"])
        if "nesterov" in out:
            out["nesterov"] = float(bool(out["nesterov"]))
        groups.append(out)
    converted: dict[Any, dict[str, Any]] = {}
    for pid, entry in state_dict["state"].items():
        new: dict[str, Any] = {}
        for k, v in entry.items():
            name = STATE_NAMES.get(k)
            if v is None and k == "momentum_buffer":
                continue
            if name is None or (name != "step" and name not in states):
                raise ValueError(f"parameter {pid}: state entry {k!r} has no counterpart in "
                                 f"'{spec.name}' (its state: step, {', '.join(sorted(states))})")
            new[name] = torch.as_tensor(v).detach().clone()
        if not new:
            continue
        if "step" not in new:
            new["step"] = torch.tensor(1.0)
        new["step"] = new["step"].to(torch.float32).reshape(())
        converted[pid] = new
    return {"state": converted, "param_groups": groups}
