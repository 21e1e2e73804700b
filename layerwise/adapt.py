"""``lw.adapt``: an adaptation program applied to any optimizer (LANGUAGE.md section 12).

``lw.adapt(base, adaptation, **hypers)`` returns a ``torch.optim.Optimizer``
whose ``step()`` runs the base's step, reads each parameter's proposed
update per unit of learning rate, ``u``, and applies the adaptation (the
LAMB trust ratio of the ``trust`` preset, for instance) with the base's
learning rate.

* A layerwise base (``lw.Optimizer``) is composed in the language: the
  result is an ``lw.Optimizer`` running the base's program with ``adapt``
  (``layerwise.compose``), where ``u`` is the base's update computed
  symbolically when its new ``w`` is ``w - lr * E``.
* Any other base (torch's own or a third party's) is wrapped
  (:class:`AdaptedOptimizer`). ``u`` must be accurate to its own rounding,
  not the difference of two nearly equal weights, so the base steps at
  ``lr = 1``: for an optimizer whose update is ``lr`` times a direction
  that, like its state, does not depend on ``lr`` (SGD, Adam, AdamW, Adamax,
  NAdam, RAdam, RMSprop, Adagrad, Adadelta, Muon: :data:`LINEAR_IN_LR`, or
  ``linear=True``), ``u`` is then the weight before minus the weight after,
  and the parameters are put back before the adaptation moves them. For
  any other optimizer (``linear=False``, or a class not in the list) the
  base steps at its own ``lr`` and ``u = (w - w_base) / lr``, a difference
  (0 where ``lr`` is 0).

The wrapper's ``param_groups`` are the base's (the adaptation's hypers added),
so LR schedulers work through either; its ``state_dict`` holds both states
and round-trips bit for bit. The wrapper keeps a copy of the parameters
that have a gradient during a step (one parameter-sized set of buffers).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch

from .compose import compose
from .errors import Span
from .optimizer import Optimizer
from .spec import Spec, load

__all__ = ["adapt", "AdaptedOptimizer", "LINEAR_IN_LR"]

#: torch.optim classes whose update is lr times a direction that, like their
#: state, does not depend on lr.
LINEAR_IN_LR = tuple(getattr(torch.optim, n) for n in (
    "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta",
    "Muon") if hasattr(torch.optim, n))


def _adaptation_spec(adaptation) -> Spec:
    spec = adaptation if isinstance(adaptation, Spec) else load(adaptation)
    if spec.program.kind != "adaptation":
        raise ValueError(f"'{spec.name}' is an optimizer, not an adaptation (a program that "
                         "starts with 'adaptation NAME')")
    return spec


def adapt(base: torch.optim.Optimizer, adaptation: Spec | str, *, linear: bool | None = None,
          compile: bool | None = None, record: str | tuple[str, int] | None = None,
          watch: tuple[str, ...] | list[str] = (), precision: str | None = None,
          rounding_seed: int | None = None, **hypers: float) -> torch.optim.Optimizer:
    """``base`` with ``adaptation`` applied to its update (see the module docstring).

    Args:
        base: any ``torch.optim.Optimizer``; an ``lw.Optimizer`` before its
            first step.
        adaptation: an adaptation preset name (``"trust"``), a path to a
            ``.lw`` file or a :class:`~layerwise.Spec` of one.
        linear: whether ``base``'s update is linear in ``lr`` with a state
            that does not depend on it (default: whether its class is one of
            :data:`LINEAR_IN_LR`); ignored for an ``lw.Optimizer`` base.
        compile: run the adaptation compiled (default: as ``base`` if it is an
            ``lw.Optimizer``, else True).
        record: the recording policy of the result's ``watched``, as
            ``lw.Optimizer``'s ``record``: ``"latest"``, ``("every", k)`` or
            ``("history", n)`` (default: the base's if it is an
            ``lw.Optimizer``, else ``"latest"``).

    An ``lw.Optimizer`` base's ``nonfinite`` policy is kept (the composite
    skips a step with a non-finite gradient as the base would). A wrapped
    base has no such guard: its own step has run before the adaptation
    sees its update.
        watch: more names of the adaptation to record (a local or a def its
            step calls once, e.g. ``["ratio"]`` of ``trust``).
        precision, rounding_seed: what the step does with bfloat16 and
            float16 parameters, as ``lw.Optimizer``'s ``precision``
            (``"master"``, ``"stochastic"``, ``"nearest"``) and
            ``rounding_seed`` (default: the base's if it is an
            ``lw.Optimizer``, else ``"master"`` and 0). For a torch base
            they apply to the adaptation, which writes the parameters: its
            master copy (``"master"``) is in ``state`` as ``adapt_master``;
            the base's own update is still computed and rounded by the base
            on the 16-bit parameters.
        **hypers: values of the adaptation's hypers (added to every param
            group that does not have them).

    Raises:
        ValueError: ``adaptation`` is not an adaptation, it clashes with the
            base program (a hyper or state of both; a watched local of both is
            kept, the adaptation's renamed ``adapt_NAME``), or an
            ``lw.Optimizer`` base has already stepped, a ``record`` that
            is not one of the policies, or a bad ``precision`` or
            ``rounding_seed`` (as ``lw.Optimizer``), before anything changes.
        SpecError: the adaptation does not check.
    """
    from .runtime.precision import check_precision, check_seed
    if precision is not None:
        check_precision(precision)
    if rounding_seed is not None:
        check_seed(rounding_seed)
    ad = _adaptation_spec(adaptation)
    if watch:
        ad = ad.watching(*watch)
    if isinstance(base, Optimizer):
        if any(base.state.values()):
            raise ValueError("adapt an lw.Optimizer before its first step (its state would "
                             "have no place for the adaptation's)")
        composite = compose(base.program, ad.program,
                            Span(ad.filename, 1, 1, 2), base.spec.filename)
        spec = Spec(composite, None, base.spec.filename)
        groups = [dict(g) for g in base.param_groups]
        for g in groups:
            g.pop("initial_lr", None)
            for k, v in hypers.items():
                g.setdefault(k, v)
        return Optimizer(groups, spec, compile=base._runner.compiled if compile is None
                         else compile, record=base.record if record is None else record,
                         nonfinite=base.nonfinite,
                         precision=base.precision if precision is None else precision,
                         rounding_seed=base.rounding_seed if rounding_seed is None
                         else rounding_seed)
    return AdaptedOptimizer(base, ad, linear=isinstance(base, LINEAR_IN_LR) if linear is None
                            else linear, compile=True if compile is None else compile,
                            record="latest" if record is None else record,
                            precision="master" if precision is None else precision,
                            rounding_seed=0 if rounding_seed is None else rounding_seed,
                            **hypers)


class AdaptedOptimizer(torch.optim.Optimizer):
    """A torch optimizer with a layerwise adaptation applied to its update.

    Made by :func:`adapt`; ``param_groups`` is the base's list (with the
    adaptation's hypers added to each group), ``watched`` the adaptation's
    watched values (kept as ``record`` says, as ``lw.Optimizer``'s), ``state`` a read-only view of both states (the
    adaptation's keys prefixed ``adapt_``).
    """

    def __init__(self, base: torch.optim.Optimizer, adaptation: Spec, linear: bool,
                 compile: bool, record: str | tuple[str, int] = "latest",
                 precision: str = "master", rounding_seed: int = 0, **hypers: float):
        self.base = base
        self.linear = linear
        for g in base.param_groups:
            for k, v in hypers.items():
                g.setdefault(k, v)
        defaults = {h.name: h.default for h in adaptation.program.hypers if h.name != "lr"}
        defaults.update(hypers)
        groups = [{"params": g["params"], "lr": float(g["lr"]),
                   **{k: g[k] for k in defaults if k in g}} for g in base.param_groups]
        self.inner = Optimizer(groups, adaptation, compile=compile, _adaptation=True,
                               record=record, precision=precision,
                               rounding_seed=rounding_seed, **defaults)
        for g, mine in zip(base.param_groups, self.inner.param_groups):
            for k in defaults:
                g.setdefault(k, mine[k])
        self.defaults = {**base.defaults, **defaults}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._link()

    def _link(self) -> None:
        self.param_groups = self.base.param_groups
        self.inner.param_groups = self.base.param_groups

    @property
    def state(self) -> dict:
        """Both optimizers' state per parameter (the adaptation's keys prefixed
        ``adapt_``); read-only: load and save through ``state_dict``."""
        out: dict = {}
        for g in self.param_groups:
            for p in g["params"]:
                entry = dict(self.base.state.get(p, {}))
                entry.update({f"adapt_{k}": v for k, v in self.inner.state.get(p, {}).items()})
                if entry:
                    out[p] = entry
        return out

    @property
    def watched(self) -> dict:
        """The adaptation's watched values (as ``lw.Optimizer.watched``)."""
        return self.inner.watched

    @property
    def record(self) -> str | tuple[str, int]:
        """The recording policy of ``watched`` (as ``lw.Optimizer.record``)."""
        return self.inner.record

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """The base's step, then the adaptation on its update; returns the loss.

        Raises:
            ValueError: from the adaptation's checks (a bad gradient, an
                out-of-range hyper), before anything changes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        self.inner._check_groups()
        saved_lr = [g["lr"] for g in self.param_groups]
        before = [p.detach().clone() for p in params]
        if self.linear:
            for g in self.param_groups:
                g["lr"] = g["lr"].new_ones(()) if isinstance(g["lr"], torch.Tensor) else 1.0
        try:
            self.base.step()
        finally:
            for g, lr in zip(self.param_groups, saved_lr):
                g["lr"] = lr
        lr_of = {p: float(g["lr"]) for g in self.param_groups for p in g["params"]}
        u = {}
        for p, w0 in zip(params, before):
            cdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            diff = w0.to(cdtype) - p.detach().to(cdtype)
            lr = lr_of[p]
            u[p] = diff if self.linear else (diff / lr if lr != 0 else torch.zeros_like(diff))
            p.copy_(w0)
        self.inner._buckets.feed = {"u": u}
        try:
            self.inner.step()
        finally:
            self.inner._buckets.feed = {}
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base's ``zero_grad``."""
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """``{"base": base.state_dict(), "adaptation": the adaptation's}``."""
        return {"base": self.base.state_dict(), "adaptation": self.inner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load both states (the adaptation's first: it is checked whole before
        anything changes).

        Raises:
            ValueError: ``state_dict`` was not made by an adapted optimizer, or
                its adaptation state does not fit (as ``lw.Optimizer``).
        """
        if set(state_dict) != {"base", "adaptation"}:
            raise ValueError("not the state dict of an adapted optimizer: expected the keys "
                             "'base' and 'adaptation'")
        self.inner.load_state_dict(state_dict["adaptation"])
        self.base.load_state_dict(state_dict["base"])
        self._link()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base and the adaptation (torch semantics)."""
        self.base.add_param_group(param_group)
        group = self.base.param_groups[-1]
        self.inner.param_groups = self.inner.param_groups[:-1] \
            if self.inner.param_groups is self.base.param_groups else self.inner.param_groups
        mine = {"params": group["params"], "lr": float(group["lr"]),
                **{k: group[k] for k in self.inner.program.hyper_names if k in group}}
        self.inner.add_param_group(mine)
        for k, v in self.inner.param_groups[-1].items():
            group.setdefault(k, v)
        self._link()
