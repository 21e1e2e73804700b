"""``lw.convert_state_dict``: a torch.optim state dict as a layerwise program's.

Moves a run from ``torch.optim.AdamW`` / ``Adam`` / ``SGD`` or timm's
``Lamb`` / ``Lars`` to the matching program without losing its moments:
their state entries are renamed to the program's (``exp_avg`` -> ``m``,
``exp_avg_sq`` -> ``v``, ``momentum_buffer`` -> ``buf``) and their
param-group options to its hypers (``betas`` -> ``beta1``, ``beta2``; flags
such as ``nesterov`` -> 0 or 1; timm's ``always_adapt`` -> nvlamb's
``use_nvlamb`` and ``max_grad_norm=None`` -> inf; a step kept per group, as
timm's Lamb does, -> each parameter's ``step``). The result loads with
``lw.Optimizer.load_state_dict``, which checks it whole.
"""
from __future__ import annotations

from typing import Any

import torch

from .spec import Spec, load

__all__ = ["convert_state_dict"]

#: torch.optim state entries -> the presets' state names.
STATE_NAMES = {"exp_avg": "m", "exp_avg_sq": "v", "momentum_buffer": "buf", "step": "step"}

#: options that layerwise has no use for (implementation choices; timm's
#: max_lr_snapshot and corrected_weight_decay act only with decoupled_decay).
IGNORED = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay",
           "max_lr_snapshot", "corrected_weight_decay")

#: an option's name -> the hyper that means the same in programs without
#: the option's own name (timm Lamb's always_adapt is nvlamb's use_nvlamb).
ALIASES = {"always_adapt": "use_nvlamb"}


def convert_state_dict(state_dict: dict[str, Any], program: Spec | str) -> dict[str, Any]:
    """``state_dict`` of a torch.optim Adam, AdamW or SGD, as ``program``'s.

    Args:
        state_dict: ``torch.optim.Optimizer.state_dict()`` output of
            torch.optim Adam, AdamW or SGD, or of timm's Lamb or Lars (not
            modified: tensors are copied).
        program: the layerwise program (a preset name such as ``"adamw"``,
            a path or a :class:`~layerwise.Spec`) that continues the run;
            its hypers must be named like the options (``lr``, ``eps``,
            ``weight_decay``, ``beta1``/``beta2``, ``momentum``,
            ``dampening``, ``nesterov``, ...) and its states ``m``/``v`` or
            ``buf``: ``"nvlamb"`` for timm's Lamb (or
            ``examples/migrating/timm_lamb.lw`` with ``trust_clip``),
            ``"timm_lars"`` for timm's Lars (see
            docs/migrating.md).

    Returns:
        A state dict for ``lw.Optimizer(..., program).load_state_dict``:
        the same ``param_groups`` order and parameter ids, each group with
        every hyper of ``program`` (those the source has no option for at
        the program's default, e.g. nvlamb's ``adam_w_mode`` = 1, which is
        what timm's Lamb does); per parameter
        ``step`` (a 0-d float tensor; SGD stores none, and a parameter with a
        momentum buffer has stepped, so 1) and the renamed state tensors. A
        parameter with no state, or SGD's ``momentum_buffer=None`` (momentum
        0), gets none: the program starts it afresh, as torch would.

    Raises:
        ValueError: an option that changes the math is on and ``program``
            has no hyper for it (``amsgrad``, ``maximize``, timm's
            ``caution``, ``decoupled_decay``, or ``trust_clip`` into
            ``nvlamb``), or a state entry has no counterpart in ``program``
            (naming the parameter id and the key).
    """
    spec = program if isinstance(program, Spec) else load(program)
    states = {s.name for s in spec.program.states}
    hypers = set(spec.program.hyper_names)
    groups = []
    group_step: dict[Any, torch.Tensor] = {}     # parameter id -> its group's step (timm Lamb)
    for gi, group in enumerate(state_dict["param_groups"]):
        out = {}
        for k, v in group.items():
            name = k if k in hypers or k not in ALIASES else ALIASES[k]
            if k in IGNORED:
                continue
            if isinstance(v, bool) and name not in hypers:
                if v:       # a flag that is on and that the program cannot express
                    raise ValueError(f"param group {gi}: {k}=True changes the update and "
                                     f"'{spec.name}' has no hyper {name!r} for it; convert "
                                     "a run without it, or into a program that has it")
                continue
            if k == "step" and isinstance(v, (torch.Tensor, int, float)):
                group_step.update({pid: torch.as_tensor(v) for pid in group["params"]})
                continue
            if k == "max_grad_norm" and v is None:
                v = float("inf")           # timm: None turns clipping off
            out[name] = float(v) if isinstance(v, bool) else v
        if "betas" in out:
            out["beta1"], out["beta2"] = (float(b) for b in out["betas"])
        for h in spec.program.hypers:     # no such option: the program's default
            out.setdefault(h.name, h.default)
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
            # a parameter with state has stepped: its group's step, or 1 (SGD's buffer)
            new["step"] = group_step.get(pid, torch.tensor(1.0)).detach().clone()
        new["step"] = new["step"].to(torch.float32).reshape(())
        converted[pid] = new
    return {"state": converted, "param_groups": groups}
