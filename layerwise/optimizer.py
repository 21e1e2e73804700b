"""``lw.Optimizer``: a ``torch.optim.Optimizer`` running a layerwise program.

LANGUAGE.md section 8 is the contract. Each hyper of the program is a
``param_groups`` key (so LR schedulers and per-group overrides work);
``for`` rules give per-parameter overrides decided when a group is added;
per-parameter state holds the program's states and ``step`` (``t``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .distributed import Combiner, is_dtensor, like, local, shard_group
from .runtime import Runner, compute_dtype, flat, runner_for
from .rules import rule_overrides
from .spec import Spec, load

__all__ = ["Optimizer"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TORCH_KEYS = {"params", "param_names", "initial_lr"}


def _as_spec(spec) -> Spec:
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, str):
        return load(spec)
    raise TypeError(f"spec must be a layerwise.Spec, a preset name or a .lw path, "
                    f"not {type(spec).__name__}")


class Optimizer(torch.optim.Optimizer):
    """A layerwise-adaptive optimizer defined by a ``.lw`` program.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs (e.g.
            ``model.named_parameters()``), or of param-group dicts. Tensors
            must be float32, float64, bfloat16 or float16, dense and real.
            DTensor parameters sharded by FSDP2 (``fully_shard``) are
            updated shard by shard, with every layer and global reduction
            taken over the whole parameter (one collective per reduction
            phase; ``layerwise.distributed``); DDP needs nothing special.
        spec: a :class:`layerwise.Spec`, a preset name (``"lamb"``) or a
            path to a ``.lw`` file.
        compile: run the step through ``torch.compile`` (default) or
            eagerly; both run the same ``torch.fx`` graph.
        **hypers: defaults for the program's hyperparameters (``lr=2e-3``).

    State per parameter: ``step`` (``t``, a 0-d tensor) and one tensor per
    program ``state``: shaped like the parameter (elem) or 0-d (layer), in
    float32 for bfloat16/float16 parameters, otherwise in the parameter's
    dtype; elem states of DTensor parameters are DTensors laid out like
    them. After each step ``watched[name][param_name]`` has one more float
    per watched name and parameter updated.

    Raises:
        ValueError: unknown hyper names (the message lists the known ones),
            a hyper value outside its range, a rule that tests names when
            the parameters have none, or an unsupported parameter.
        SpecError: if ``spec`` names a program that does not check.
    """

    def __init__(self, params: Iterable, spec: Spec | str = "lamb", compile: bool = True,
                 **hypers: float):
        self.spec = _as_spec(spec)
        self.program = self.spec.program
        self._runner: Runner = runner_for(self.program, bool(compile))
        self._overrides: list[list[dict[str, float]]] = []
        self._numels: dict[torch.Tensor, torch.Tensor] = {}
        self.watched: dict[str, dict[str, list[float]]] = {n: {} for n in self.program.watches}
        self._check_hypers(hypers, "keyword argument")
        defaults = {h.name: h.default for h in self.program.hypers}
        defaults.update({k: float(v) for k, v in hypers.items()})
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- groups
    def _check_hypers(self, values: dict[str, Any], where: str) -> None:
        unknown = [k for k in values if k not in self.program.hyper_names and k not in _TORCH_KEYS]
        if unknown:
            raise ValueError(f"unknown hyperparameter{'s' * (len(unknown) > 1)} "
                             f"{', '.join(map(repr, unknown))} in {where} for optimizer "
                             f"'{self.program.name}'; known: {', '.join(self.program.hyper_names)}")
        for k, v in values.items():
            if k in _TORCH_KEYS:
                continue
            h = self.program.hyper(k)
            try:
                value = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{k}={v!r} in {where} is not a number") from None
            if not h.admits(value):
                raise ValueError(f"{k}={v!r} in {where} is outside its range {h.range}"
                                 if h.range is not None else f"{k}={v!r} in {where} is not a number")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch semantics); apply the program's ``for`` rules to it.

        Raises:
            ValueError: unknown or out-of-range hypers in the group, complex,
                integer or otherwise unsupported parameters, or a name rule
                applied to unnamed parameters.
        """
        index = len(self.param_groups)
        explicit = {k for k in param_group if k not in _TORCH_KEYS}
        self._check_hypers({k: param_group[k] for k in explicit}, f"param group {index}")
        probe = dict(param_group)
        params = probe["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        probe["params"] = params
        names: list[str | None] = []
        tensors: list[torch.Tensor] = []
        for p in params:
            name, tensor = (p[0], p[1]) if isinstance(p, tuple) else (None, p)
            names.append(name)
            tensors.append(tensor)
        for name, p in zip(names, tensors):
            if isinstance(p, torch.Tensor):
                self._check_param(p, name if name is not None else f"group {index}")
        overrides = [rule_overrides(self.program.rules, p.dim(), p.numel(), n, explicit)
                     for n, p in zip(names, tensors) if isinstance(p, torch.Tensor)]
        super().add_param_group(probe)
        self._overrides.append(overrides)

    @staticmethod
    def _check_param(p: torch.Tensor, where: str) -> None:
        if p.is_complex():
            raise ValueError(f"parameter {where} is complex ({p.dtype}); layerwise optimizers "
                             "need real parameters (view it as real with torch.view_as_real)")
        if p.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"parameter {where} has dtype {p.dtype}; supported: float32, "
                             "float64, bfloat16, float16")
        if p.is_sparse:
            raise ValueError(f"parameter {where} is sparse; only dense parameters are supported")

    def _param_name(self, gi: int, pi: int, flat: int) -> str:
        names = self.param_groups[gi].get("param_names")
        return names[pi] if names is not None else f"param{flat}"

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Update every parameter that has a gradient; returns ``closure()``'s loss.

        All checks (hyper ranges, sparse gradients) happen before anything
        is modified, so a step that raises leaves parameters and state as
        they were.

        Raises:
            ValueError: a group's hyper value outside its range, a sparse
                or mismatched gradient (for a DTensor parameter: one not
                sharded like it), or a DTensor parameter with a layout
                other than Shard over one mesh dimension / Replicate.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect()
        if not work:
            return loss
        runner = self._runner
        groups = [item["group"] for item in work]
        sharded = any(g is not None for g in groups)
        combine = Combiner(groups) if sharded else None
        self._init_states([item for item in work if not self.state[item["param"]]], sharded)
        # t of this step for each parameter, and the tensors of it shared by
        # every parameter with the same hyper values and step count
        t_now: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        for item in work:
            t = float(self.state[item["param"]]["step"]) + 1
            key = (id(item["hypers"]), t)
            if key not in t_now:
                t_now[key] = (torch.tensor(t, dtype=item["dtype"], device=item["param"].device),
                              item["hypers"])
            item["t_key"] = key
            item["args"] = self._args(item)
        globals_: list[torch.Tensor] = []
        if runner.reduce_fn is not None:
            consts = {k: runner.reduce_consts(t, hypers) for k, (t, hypers) in t_now.items()}
            globals_ = runner.finish_globals(runner.reduce(
                [item["args"] + (consts[item["t_key"]],) for item in work], combine))
        consts = {k: runner.update_consts(t, hypers, [x.to(t.dtype) for x in globals_])
                  for k, (t, hypers) in t_now.items()}
        outputs = runner.update([item["args"] + (consts[item["t_key"]],) for item in work],
                                combine)
        for i, n in enumerate(self.program.watches):
            floats = torch.stack([values[i].to(torch.float64) for values in outputs]).tolist()
            record = self.watched.setdefault(n, {})
            for item, x in zip(work, floats):
                record.setdefault(item["name"], []).append(x)
        return loss

    def _collect(self) -> list[dict[str, Any]]:
        """Validate everything and list the parameters to update (changes nothing)."""
        work = []
        hyper_tensors: dict[tuple, list[torch.Tensor]] = {}
        flat = -1
        for gi, group in enumerate(self.param_groups):
            for k in self.program.hyper_names:
                h = self.program.hyper(k)
                if not h.admits(float(group[k])):
                    raise ValueError(f"param group {gi}: {k}={group[k]!r} is outside its range "
                                     f"{h.range}")
            for pi, p in enumerate(group["params"]):
                flat += 1
                if p.grad is None:
                    continue
                name = self._param_name(gi, pi, flat)
                if p.grad.is_sparse:
                    raise ValueError(f"parameter {name} has a sparse gradient; layerwise "
                                     "optimizers need dense gradients")
                if p.grad.shape != p.shape:
                    raise ValueError(f"parameter {name} has shape {tuple(p.shape)} but its "
                                     f"gradient has shape {tuple(p.grad.shape)}")
                pg = shard_group(p, name)
                if is_dtensor(p) and (not is_dtensor(p.grad)
                                      or p.grad.placements != p.placements
                                      or local(p.grad).shape != local(p).shape):
                    raise ValueError(f"parameter {name} is a DTensor with placements "
                                     f"{p.placements} but its gradient is not sharded the "
                                     "same way")
                dtype = compute_dtype(p.dtype)
                ov = self._overrides[gi][pi] if pi < len(self._overrides[gi]) else {}
                values = tuple(float(ov.get(k, group[k])) for k in self.program.hyper_names)
                key = (values, dtype, p.device)
                if key not in hyper_tensors:
                    hyper_tensors[key] = [torch.tensor(v, dtype=dtype, device=p.device)
                                          for v in values]
                work.append({"param": p, "name": name, "dtype": dtype, "group": pg,
                             "hypers": hyper_tensors[key]})
        return work

    def _init_states(self, items: list[dict[str, Any]], sharded: bool) -> None:
        """Create the state of parameters at their first step (``step`` = 0 and
        the program's initial values; elem states laid out like the parameter)."""
        if not items:
            return
        combine = Combiner([item["group"] for item in items]) if sharded else None
        inits = self._runner.init_states(
            [(local(item["param"]).detach().reshape(-1).to(item["dtype"]),
              self._numel(item["param"], item["dtype"]), item["hypers"]) for item in items],
            combine)
        lowered = self._runner.lowered
        for item, values in zip(items, inits):
            p, dtype = item["param"], item["dtype"]
            state = self.state[p]
            state["step"] = torch.zeros((), dtype=dtype, device=p.device)
            seen: set[int] = set()
            for name, layer, value in zip(lowered.state_names, lowered.layer_states, values):
                # two states with the same initial expression share one output
                # tensor of the init graph (CSE): copy it for the second, so they
                # never alias (the outputs never alias w or the hypers)
                if id(value) in seen:
                    value = value.clone()
                seen.add(id(value))
                state[name] = (value.reshape(()) if layer else
                               like(value.reshape(local(p).shape), p))

    def _numel(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``p``'s element count as a 0-d tensor of ``dtype`` (cached per parameter)."""
        numel = self._numels.get(p)
        if numel is None or numel.dtype != dtype:
            numel = self._numels[p] = torch.tensor(float(p.numel()), dtype=dtype,
                                                   device=p.device)
        return numel

    def _args(self, item: dict[str, Any]):
        """The runner's per-parameter arguments: 1-D aliases of the parameter, its
        gradient and elem states; ``t``, ``numel``, hypers and layer states."""
        p = item["param"]
        state = self.state[p]
        numel = self._numel(p, item["dtype"])
        states = [state[n] if layer else flat(local(state[n]))
                  for n, layer in zip(self._runner.lowered.state_names,
                                      self._runner.lowered.layer_states)]
        return (flat(local(p.detach())), flat(local(p.grad.detach()).contiguous()), state["step"],
                numel,
                item["hypers"], states)

    # ---------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (torch semantics), keeping state in the compute dtype.

        ``torch.optim.Optimizer`` casts loaded state to the parameter's dtype;
        for bfloat16/float16 parameters that would lose the float32 state,
        so state tensors are re-read from ``state_dict`` in the compute dtype.
        The given ``state_dict`` is never modified or aliased. ``watched``
        starts afresh: its history is not part of the state dict (and
        ``torch.distributed.checkpoint``'s ``get_state_dict`` may run a step
        with ``lr = 0`` on a fresh optimizer to create state before loading).

        Raises:
            ValueError: an elem state whose shape differs from its parameter's,
                or a plain tensor for a DTensor parameter (or the reverse, or
                other placements); nothing is changed then.
        """
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        mine = [p for g in self.param_groups for p in g["params"]]
        self._check_loaded(state_dict, saved, mine)
        super().load_state_dict(state_dict)
        self.watched = {n: {} for n in self.program.watches}
        for sid, p in zip(saved, mine):
            entry = state_dict["state"].get(sid)
            if entry is None:
                continue
            dtype = compute_dtype(p.dtype)
            self.state[p] = {k: (v.to(device=p.device, dtype=dtype, copy=True)
                                 if isinstance(v, torch.Tensor) else v)
                             for k, v in entry.items()}

    def _check_loaded(self, state_dict: dict[str, Any], saved: list, mine: list) -> None:
        lowered = self._runner.lowered
        for index, (sid, p) in enumerate(zip(saved, mine)):
            entry = state_dict["state"].get(sid) or {}
            for name, layer in zip(lowered.state_names, lowered.layer_states):
                v = entry.get(name)
                if layer or not isinstance(v, torch.Tensor):
                    continue
                where = f"state '{name}' of parameter {index}"
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"{where} has shape {tuple(v.shape)}, the parameter "
                                     f"{tuple(p.shape)}")
                if is_dtensor(p) != is_dtensor(v) or (
                        is_dtensor(p) and tuple(v.placements) != tuple(p.placements)):
                    raise ValueError(f"{where} is laid out as "
                                     f"{getattr(v, 'placements', 'a plain tensor')}, the "
                                     f"parameter as {getattr(p, 'placements', 'a plain tensor')}"
                                     "; load sharded state with torch.distributed.checkpoint")
