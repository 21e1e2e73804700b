"""``lw.Optimizer``: a ``torch.optim.Optimizer`` running a layerwise program.

LANGUAGE.md section 8 is the contract. Each hyper of the program is a
``param_groups`` key (so LR schedulers and per-group overrides work);
``for`` rules give per-parameter overrides decided when a group is added;
per-parameter state holds the program's states and ``step`` (``t``). The
step runs on the multi-tensor runtime (``layerwise.runtime``): every
parameter sharing a dtype and device in a constant number of calls.
"""
from __future__ import annotations

import math
import numbers
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .rules import ParamInfo, hyper_values, matching_rules, param_info, row_block
from .runtime.buckets import BucketSet
from .runtime.distributed import Combiner
from .runtime.layout import compute_dtype, unit_shape
from .runtime import precision as _precision
from .runtime.runner import Runner, any_nonfinite, runner_for
from .runtime.validate import check_param, check_state_entry
from .spec import Spec, load

__all__ = ["Optimizer"]

_TORCH_KEYS = {"params", "param_names", "initial_lr"}

#: the values of ``nonfinite=``
NONFINITE = ("none", "skip")


@dataclass(frozen=True)
class ParamRules:
    """A parameter's ``for`` rules, decided when its group is added: which
    rules match, its numbers, the hypers its param group gives explicitly,
    its ``row_block``; ``key`` is what its hyper values depend on besides the
    group's values (parameters with equal keys share them)."""
    matching: tuple[int, ...]
    info: ParamInfo
    explicit: frozenset[str]
    row_block: int
    key: tuple = field(init=False, compare=False)

    def __post_init__(self):
        i = self.info
        object.__setattr__(self, "key", (self.matching, i.ndim, i.numel, i.rows, i.cols,
                                         self.explicit))


def _as_spec(spec) -> Spec:
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return load(spec)
    raise TypeError(f"spec must be a layerwise.Spec, a preset name or a .lw path, "
                    f"not {type(spec).__name__}")


def _record_policy(record: Any) -> str | tuple[str, int]:
    """``record`` as ``"latest"``, ``("every", k)`` or ``("history", n)`` (k, n
    whole numbers >= 1).

    Raises:
        ValueError: naming ``record`` and its value, for anything else.
    """
    if isinstance(record, str) and record == "latest":
        return "latest"
    if (isinstance(record, (tuple, list)) and len(record) == 2 and record[0] in ("every", "history")
            and isinstance(record[1], numbers.Integral) and not isinstance(record[1], bool)
            and record[1] >= 1):
        return (str(record[0]), int(record[1]))
    raise ValueError(f"record={record!r} is not a recording policy: use \"latest\" (the last "
                     f"value), (\"every\", k) (every k-th step's value) or (\"history\", n) "
                     f"(the last n values), with k and n whole numbers >= 1")


def _from_numpy(value: Any) -> Any:
    """A NumPy array or scalar as a tensor (a copy); anything else unchanged
    (and so refused by the checks, naming the parameter and key, if it is
    not a number or a tensor)."""
    if type(value).__module__ == "numpy" and hasattr(value, "__array__"):
        import numpy
        try:
            return torch.tensor(numpy.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def _number_of(value: Any) -> float:
    """A number, NumPy scalar or one-element tensor as a float.

    Raises:
        TypeError, ValueError, RuntimeError: for anything else.
    """
    value = _from_numpy(value)
    if isinstance(value, bool):
        raise TypeError("a bool is not a count")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError("not one real number")
        value = value.detach().to("cpu", torch.float64).reshape(())
    if not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{type(value).__name__} is not a number")
    return float(value)


def _largest_step(entries: Iterable) -> int:
    """The largest ``step`` of a state dict's per-parameter entries (0 if none)."""
    largest = 0
    for e in entries:
        v = e.get("step") if e else None
        if v is None:
            continue
        try:
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            largest = max(largest, int(float(v)))
        except (TypeError, ValueError, RuntimeError):
            pass
    return largest


class Optimizer(torch.optim.Optimizer):
    """A layerwise-adaptive optimizer defined by a ``.lw`` program.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs (e.g.
            ``model.named_parameters()``), or of param-group dicts. Tensors
            must be float32, float64, bfloat16 or float16, dense, real and
            leaves; any shape (0-d and empty included) and memory layout
            (contiguous, transposed, channels_last, strided views). DTensor
            parameters sharded by FSDP2 (``fully_shard``) are updated shard
            by shard, with every layer and global reduction taken over the
            whole parameter (one collective per reduction phase); DDP needs
            nothing special.
        spec: a :class:`layerwise.Spec`, a preset name (``"lamb"``) or a
            path to a ``.lw`` file.
        compile: run the step through ``torch.compile`` (default) or
            eagerly; both run the same ``torch.fx`` graphs. The first step
            then pays for compiling: a cold ``torch.compile`` takes 10-30 s
            on a 2-core CPU, a few seconds with a warm inductor cache. It is
            paid once per program (optimizers of the same program share the
            compiled step) and not again when hyper values change (a
            scheduler's ``lr``): they reach the step as tensors.
        record: which watched values ``watched`` keeps (see below):
            ``"latest"`` (default), ``("every", k)`` or ``("history", n)``.
        watch: more names to record in ``watched``, as
            ``spec.watching(*watch)``: a layer-kind local of the step or a
            ``def`` the step calls once (``["trust"]`` for lamb's trust
            ratio, recorded under the def's name; the update is unchanged).
            Raises ``SpecError`` (line, column) for a name that cannot be
            watched.
        names_from: a ``torch.nn.Module`` whose ``named_parameters()`` name
            the parameters given as bare tensors (here and in later
            ``add_param_group`` calls), for trainers that build the param
            groups themselves (Hugging Face ``Trainer`` with
            ``optimizer_cls_and_kwargs=(lw.Optimizer, {"spec": ...,
            "names_from": model})``), so ``for name ~ ...`` rules, ``watched``
            and :meth:`hypers_of` see the module's names. Parameters given
            as ``(name, tensor)`` keep their names. A bare tensor that is not
            a parameter of the module is a ``ValueError``.
        nonfinite: what a step does when a gradient holds a NaN or an
            infinity. ``"none"`` (default): nothing special, the program's
            arithmetic runs on it (README "Non-finite gradients" says what
            each preset then does). ``"skip"``: when any gradient of a
            parameter the step updates has a non-finite element, the whole
            step is skipped: every parameter, every state and every ``step``
            count stay as they were, bit for bit, and :attr:`skipped_steps`
            goes up by one. Decided on the device, with no host
            synchronisation: every write of the step is masked by the flag
            (costs one read of the gradients, and, on the eager path, masked
            instead of plain writes; a chunk of 1,024 finite values whose sum
            overflows, above about 3e35 per value in float32, counts as
            non-finite: ``runtime.runner.any_nonfinite``). A parameter's first step, if skipped,
            still creates its state at the initial values (``step`` 0);
            watched values of a skipped step are recorded as computed.
            Under FSDP2 the flag is combined over each process group of
            sharded parameters with one ``all_reduce`` (MAX) per step, so
            every rank skips the same steps. Any other value is a
            ``ValueError``.
        precision: what a step does with bfloat16 and float16 parameters,
            whose update is computed in float32 (docs/mixed-precision.md;
            float32 and float64 parameters are not affected):

            * ``"master"`` (default): each 16-bit parameter has a float32
              master copy, ``state[p]["master"]`` (shaped and laid out like
              ``p``, a DTensor sharded like it under FSDP2); the step reads
              and updates the master and rounds it to nearest into ``p``,
              so the update is exactly the float32 update (Micikevicius et
              al. 2018, arXiv:1710.03740). Costs 4 bytes per parameter
              element. The master is saved by ``state_dict`` and restored by
              ``load_state_dict`` bit for bit; a state loaded without one
              (saved under another precision) gets it from ``p``. It
              follows ``p`` when you change ``p``: a parameter replaced
              (``p.data = ...``) or changed in place (``model.
              load_state_dict``, ``p.copy_``) that is no longer its master
              rounded to nearest gets its master set from its new value at
              the next step.
            * ``"stochastic"``: the float32 result is rounded stochastically
              into ``p`` (up with probability equal to the rounded-off
              fraction; unbiased, Gupta et al. 2015, arXiv:1502.02551). The
              random bits are a hash of ``rounding_seed``, the parameter's
              position in the optimizer, its ``step`` and each element's
              index in the parameter (its global index under FSDP2): a
              resumed run (same seed, from ``state_dict``) rounds as the
              uninterrupted one, eager and compiled steps round alike, and
              bucketing and sharding do not change the bits. No memory cost.
            * ``"nearest"``: round to nearest even (no memory cost; most
              updates smaller than half a bfloat16 spacing, 2^-9 relative,
              are lost).

            Anything else is a ``ValueError``.
        rounding_seed: the seed of ``"stochastic"``'s random bits, a whole
            number in ``[0, 2**63)`` (default 0; give runs that should
            round differently different seeds). Saved in ``state_dict``
            (key ``"rounding_seed"``, under ``"stochastic"``) and restored by
            ``load_state_dict``. Not used by the other precisions.
        **hypers: defaults for the program's hyperparameters (``lr=2e-3``);
            ``betas=(beta1, beta2)`` too if it has ``beta1`` and ``beta2``.

    ``skipped_steps``: the number of steps ``nonfinite="skip"`` skipped, a
    0-d int64 tensor on the parameters' device (read it with ``int()``, a
    host synchronisation, when you log). It is saved in ``state_dict()``
    (key ``"skipped_steps"``, only under ``"skip"``) and restored by
    ``load_state_dict`` (0 if the state dict has none).

    torch conventions: a program with hypers ``beta1`` and ``beta2`` also takes
    ``betas=(beta1, beta2)`` (as a keyword argument or a param-group key, each
    checked against the ranges of ``beta1`` and ``beta2``; giving it beside a
    disagreeing ``beta1`` or ``beta2`` is an error), and reports ``betas`` in
    ``defaults`` and in every param group, so OneCycleLR / CyclicLR with
    ``cycle_momentum=True`` and Lightning's ``LearningRateMonitor(log_momentum=
    True)`` see and set ``beta1``. At every step (and in ``state_dict()`` and
    :meth:`hypers_of`) each of a group's ``beta1`` and ``beta2`` is taken from
    whichever form, ``betas`` or the scalar, the user or a scheduler changed
    since the last step; if both changed to different values the step raises
    ``ValueError`` naming the group before anything changes. After the step
    both forms agree. Programs without ``beta1`` and ``beta2`` get no
    ``betas`` key, and ``betas=`` is an unknown hyperparameter for them. A
    state dict saved without ``betas`` loads (it is added).
    :meth:`hypers_of` gives the hyper values a parameter gets after its group
    and its ``for`` rules.

    State per parameter: ``step`` (``t``, a 0-d tensor) and one tensor per
    program ``state``: shaped and laid out like the parameter (elem) or 0-d
    (layer), in float32 for bfloat16/float16 parameters, otherwise in the
    parameter's dtype; elem states of DTensor parameters are DTensors laid
    out like them; under ``precision="master"``, for bfloat16/float16
    parameters, ``"master"`` (float32, laid out like the parameter). They
    are views of the runtime's flat buffers
    (``layerwise.runtime.layout``, which also says what the optimizer does
    to parameters and gradients: it may make them views of its buffers, with
    the same values).

    Watched values: ``watched`` is ``{watched name: {parameter name: [floats,
    oldest first]}}``, recorded at steps that update the parameter, as the
    ``record`` policy says (steps count this optimizer's ``step()`` calls
    that updated any parameter, from construction, or from the largest
    ``step`` of a loaded state dict):

    * ``record="latest"`` (default): only the last value per watched name and
      parameter (each list has one element); memory: 1 value each.
    * ``record=("every", k)``: the values of every k-th step (steps k, 2k,
      ...), all kept; memory: steps / k values each.
    * ``record=("history", n)``: the last n values (a ring); memory: n values
      each.

    Values stay on the device until ``watched`` is read (one transfer per
    recorded step still held); the device tensors held are bounded by the
    policy too (under "latest" and "history" only those whose values can
    still be returned; under every-k only the recorded steps').

    Parameter names (the keys of ``watched``, and what :meth:`hypers_of` and
    messages use) are those given (``model.named_parameters()``), or
    ``"param<i>"`` for unnamed ones, ``i`` counting over all groups. Names
    are made distinct in order over groups and parameters: the first
    parameter with a name keeps it, each later one gets ``"name#k"`` with
    ``k`` the smallest number >= 1 giving a name not used before it (two
    modules' ``named_parameters()`` as two groups: ``"weight"`` and
    ``"weight#1"``).

    Raises:
        ValueError: unknown hyper names (the message lists the known ones),
            a hyper value outside its range, a rule that tests names when
            the parameters have none, an unsupported parameter, or a
            ``record`` that is not one of the policies, a ``nonfinite``
            other than ``"none"`` and ``"skip"``, a ``precision`` other than
            ``"master"``, ``"stochastic"`` and ``"nearest"`` (or
            ``"master"`` for a program with a state named ``master``), or a
            ``rounding_seed`` that is not a whole number in ``[0, 2**63)``.
        SpecError: if ``spec`` names a program that does not check.
    """

    def __init__(self, params: Iterable, spec: Spec | str = "lamb", compile: bool = True,
                 *, record: str | tuple[str, int] = "latest", watch: Sequence[str] = (),
                 names_from: torch.nn.Module | None = None, nonfinite: str = "none",
                 precision: str = "master", rounding_seed: int = 0,
                 _adaptation: bool = False, **hypers: float):
        self._precision = _precision.check_precision(precision)
        self._rounding_seed = _precision.check_seed(rounding_seed)
        if not (isinstance(nonfinite, str) and nonfinite in NONFINITE):
            raise ValueError(f"nonfinite={nonfinite!r} is not a policy for non-finite gradients: "
                             f"use \"none\" (update as computed, the default) or \"skip\" (skip "
                             f"the whole step when any gradient holds a NaN or an infinity)")
        self._nonfinite = nonfinite
        #: steps skipped by ``nonfinite="skip"`` (a 0-d int64 tensor on the device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64)
        self._record = _record_policy(record)
        if names_from is not None and not isinstance(names_from, torch.nn.Module):
            raise ValueError(f"names_from must be a torch.nn.Module, not "
                             f"{type(names_from).__name__}")
        self._names_from = (None if names_from is None else
                            {id(p): n for n, p in names_from.named_parameters()})
        self.spec = _as_spec(spec)
        if watch:
            self.spec = self.spec.watching(*watch)
        self.program = self.spec.program
        self._runner: Runner = runner_for(self.program, bool(compile))
        lowered = self._runner.lowered
        if precision == "master" and "master" in lowered.state_names:
            raise ValueError(f"precision='master' keeps a float32 master copy as "
                             f"state['master'], but program '{self.program.name}' has a state "
                             f"named 'master': rename it, or use precision='stochastic' or "
                             f"'nearest'")
        if self.program.kind == "adaptation" and not _adaptation:
            raise ValueError(f"'{self.program.name}' is an adaptation, not an optimizer: apply "
                             f"it to one with lw.adapt(optimizer, '{self.program.name}'), or "
                             f"with 'adapt {self.program.name}' in a program")
        self._buckets = BucketSet(lowered.state_names, lowered.state_kinds,
                                  self.program.hyper_names, self._runner.chunk,
                                  ("u",) if self.program.kind == "adaptation" else (),
                                  lowered.units, self._precision)
        self._rules: list[list[ParamRules]] = []
        self._hyper_cache: tuple[tuple, dict] = ((), {})
        self._watched: dict[str, dict[str, list[float]]] = {n: {} for n in self.program.watches}
        # recorded values not yet read: {entry id: [param names, (watches x names) tensor,
        # count of its columns still wanted]}; under a bounded policy, per name the
        # (entry id, column) of its last values (at most the bound)
        self._pending: dict[int, list] = {}
        self._pending_of: dict[str, deque] = {}
        self._entries = 0
        self._steps = 0
        self._names_cache: tuple[tuple, list[list[str]]] = ((), [])
        names = self.program.hyper_names
        self._has_betas = "beta1" in names and "beta2" in names
        # per group: (the group dict, its (beta1, beta2) when betas were last synced)
        self._betas_synced: list[tuple[dict, tuple[float, float] | None]] = []
        self._check_hypers(hypers, "keyword argument")
        defaults = {h.name: h.default for h in self.program.hypers}
        defaults.update({k: float(v) for k, v in hypers.items() if k != "betas"})
        if self._has_betas:
            if "betas" in hypers:
                defaults["beta1"], defaults["beta2"] = self._betas_value(
                    hypers["betas"], "keyword argument")
            defaults["betas"] = (defaults["beta1"], defaults["beta2"])
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- groups
    def _check_hypers(self, values: dict[str, Any], where: str) -> None:
        """Known hyper names (``betas`` too if the program has ``beta1`` and
        ``beta2``), values in range, ``betas`` agreeing with an explicit
        ``beta1`` / ``beta2`` beside it."""
        unknown = [k for k in values if k not in self.program.hyper_names and k not in _TORCH_KEYS
                   and not (k == "betas" and self._has_betas)]
        if unknown:
            raise ValueError(f"unknown hyperparameter{'s' * (len(unknown) > 1)} "
                             f"{', '.join(map(repr, unknown))} in {where} for optimizer "
                             f"'{self.program.name}'; known: {', '.join(self.program.hyper_names)}")
        for k, v in values.items():
            if k in _TORCH_KEYS:
                continue
            if k == "betas":
                pair = self._betas_value(v, where)
                for i, b in enumerate(("beta1", "beta2")):
                    if b in values and float(values[b]) != pair[i]:
                        raise ValueError(f"betas={v!r} and {b}={values[b]!r} in {where} "
                                         f"disagree: give one of them")
                continue
            h = self.program.hyper(k)
            try:
                value = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{k}={v!r} in {where} is not a number") from None
            if not h.admits(value):
                raise ValueError(f"{k}={v!r} in {where} is outside its range {h.range}"
                                 if h.range is not None else f"{k}={v!r} in {where} is not a number")

    def _betas_value(self, value: Any, where: str) -> tuple[float, float]:
        """``betas`` as ``(beta1, beta2)`` floats, each in its hyper's range.

        Raises:
            ValueError: naming ``betas``, its value and ``where``.
        """
        try:
            pair = tuple(float(b) for b in value)
        except (TypeError, ValueError):
            pair = ()
        if len(pair) != 2:
            raise ValueError(f"betas={value!r} in {where} is not a pair of numbers "
                             f"(beta1, beta2)")
        for b, x in zip(("beta1", "beta2"), pair):
            h = self.program.hyper(b)
            if not h.admits(x):
                raise ValueError(f"betas={value!r} in {where}: its {b} {x!r} is outside its "
                                 f"range {h.range}")
        return pair  # type: ignore[return-value]

    def _betas_plan(self) -> list[tuple[float, float]]:
        """Each group's effective ``(beta1, beta2)`` for the next step, per
        component from whichever of ``betas`` or ``beta1`` / ``beta2`` changed
        since the last sync (changes nothing; empty if the program has no
        ``betas``).

        Raises:
            ValueError: naming the group, if both forms changed and disagree,
                ``betas`` is not a pair, or a changed value is out of range.
        """
        if not self._has_betas:
            return []
        plan = []
        synced = self._betas_synced
        for gi, group in enumerate(self.param_groups):
            where = f"param group {gi}"
            scalars = (float(group["beta1"]), float(group["beta2"]))
            if "betas" not in group:
                plan.append(scalars)
                continue
            pair = self._betas_value(group["betas"], where)
            last = synced[gi][1] if gi < len(synced) and synced[gi][0] is group else None
            new = []
            for i, b in enumerate(("beta1", "beta2")):
                if scalars[i] == pair[i] or (last is not None and pair[i] == last[i]):
                    new.append(scalars[i])
                elif last is not None and scalars[i] == last[i]:
                    new.append(pair[i])
                else:
                    raise ValueError(f"{where}: betas={group['betas']!r} and "
                                     f"{b}={group[b]!r} were both changed since the last step "
                                     f"and disagree; change only one of them (or both to the "
                                     f"same value)")
            plan.append((new[0], new[1]))
        return plan

    def _sync_betas(self, plan: list[tuple[float, float]] | None = None) -> None:
        """Make ``betas`` and ``beta1`` / ``beta2`` agree in every group (and
        ``defaults``), with the values of :meth:`_betas_plan`; remember them."""
        if not self._has_betas:
            return
        plan = self._betas_plan() if plan is None else plan
        for group, (b1, b2) in zip(self.param_groups, plan):
            if float(group["beta1"]) != b1:
                group["beta1"] = b1
            if float(group["beta2"]) != b2:
                group["beta2"] = b2
            if "betas" not in group or tuple(float(b) for b in group["betas"]) != (b1, b2):
                group["betas"] = (b1, b2)
        self._betas_synced = [(g, b) for g, b in zip(self.param_groups, plan)]
        d = self.defaults
        if "betas" not in d or tuple(d["betas"]) != (float(d["beta1"]), float(d["beta2"])):
            d["betas"] = (float(d["beta1"]), float(d["beta2"]))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch semantics); apply the program's ``for`` rules to it.

        If the program has ``beta1`` and ``beta2``, the group may give
        ``betas=(beta1, beta2)`` instead of (or agreeing with) them, and gets a
        ``betas`` key either way.

        Raises:
            ValueError: unknown or out-of-range hypers in the group, complex,
                integer or otherwise unsupported parameters, or a name rule
                applied to unnamed parameters.
        """
        index = len(self.param_groups)
        explicit = {k for k in param_group if k not in _TORCH_KEYS}
        self._check_hypers({k: param_group[k] for k in explicit}, f"param group {index}")
        probe = dict(param_group)
        if self._has_betas:
            if "betas" in probe:
                probe["beta1"], probe["beta2"] = self._betas_value(probe["betas"], "")
                explicit |= {"beta1", "beta2"}
            probe["betas"] = tuple(float(probe.get(b, self.defaults[b]))
                                   for b in ("beta1", "beta2"))
        params = probe["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if self._names_from is not None:
            params = [self._named(p, index) for p in params]
        probe["params"] = params
        names: list[str | None] = []
        tensors: list[torch.Tensor] = []
        for p in params:
            name, tensor = (p[0], p[1]) if isinstance(p, tuple) else (None, p)
            names.append(name)
            tensors.append(tensor)
        given = param_group.get("param_names")     # torch's key: names of bare tensors
        if (isinstance(given, (list, tuple)) and len(given) == len(names)
                and all(n is None for n in names) and all(isinstance(n, str) for n in given)):
            names = list(given)
        rules = []
        before = sum(len(g["params"]) for g in self.param_groups)
        for k, (name, p) in enumerate(zip(names, tensors)):
            where = (name if name is not None else f"param{before + k}") + \
                f" (param group {index}, position {k})"
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"parameter {where} is a {type(p).__name__}, not a tensor")
            check_param(p, where)
            rules.append(self._param_rules(p, name, name if name is not None else where,
                                           frozenset(explicit)))
        super().add_param_group(probe)
        self._rules.append(rules)
        if self._has_betas:
            synced = self._betas_synced[:index]
            synced += [(g, None) for g in self.param_groups[len(synced):index]]
            self._betas_synced = [*synced, (probe, probe["betas"])]

    def _named(self, p: Any, index: int) -> Any:
        """``p`` as ``(name, p)`` by ``names_from`` (a bare tensor of param
        group ``index``); anything else unchanged."""
        if not isinstance(p, torch.Tensor):
            return p
        name = self._names_from.get(id(p))
        if name is None:
            raise ValueError(f"param group {index}: a tensor of shape {tuple(p.shape)} is not "
                             "a parameter of the names_from module")
        return (name, p)

    def _param_rules(self, p: torch.Tensor, name: str | None, where: str,
                     explicit: frozenset[str]) -> ParamRules:
        info = param_info(p.shape, name)
        matching = matching_rules(self.program.rules, info)
        try:
            block = row_block(self.program.rules, matching, info)
        except ValueError as err:
            raise ValueError(f"parameter {where}: {err}") from None
        return ParamRules(matching, info, explicit, block)

    def _rules_of(self, gi: int, pi: int, p: torch.Tensor) -> ParamRules:
        """The rules of parameter ``pi`` of group ``gi`` (made now for one added
        to a group's list after the group was)."""
        rules = self._rules[gi]
        if pi < len(rules):
            return rules[pi]
        group = self.param_groups[gi]
        names = group.get("param_names")
        explicit = rules[0].explicit if rules else frozenset()
        while len(rules) <= pi:
            k = len(rules)
            q = group["params"][k]
            where = self._param_name(gi, k, k)
            if not isinstance(q, torch.Tensor):
                raise ValueError(f"parameter {where} (param group {gi}, position {k}) is a "
                                 f"{type(q).__name__}, not a tensor")
            check_param(q, f"{where} (param group {gi}, position {k})")
            rules.append(self._param_rules(q, names[k] if names else None, where, explicit))
        return rules[pi]

    def _param_name(self, gi: int, pi: int, flat: int) -> str:
        """The name of parameter ``pi`` of group ``gi`` (``flat`` over all
        groups), made distinct (the class docstring's rule)."""
        groups = self.param_groups
        key = tuple((id(g), id(g.get("param_names")), len(g["params"])) for g in groups)
        cached, names = self._names_cache
        if cached != key:
            used: set[str] = set()
            names = []
            flat_i = 0
            for g in groups:
                given = g.get("param_names")
                mine = []
                for i in range(len(g["params"])):
                    base = given[i] if given is not None and i < len(given) else f"param{flat_i}"
                    name, k = base, 0
                    while name in used:
                        k += 1
                        name = f"{base}#{k}"
                    used.add(name)
                    mine.append(name)
                    flat_i += 1
                names.append(mine)
            self._names_cache = (key, names)
        return names[gi][pi]

    def hypers_of(self, name_or_param: str | torch.Tensor) -> dict[str, float]:
        """The hyper values one parameter gets at the next step.

        ``name_or_param`` is the parameter's name as given at construction
        (``model.named_parameters()``; unnamed parameters are ``"param<i>"``,
        ``i`` counting over all groups, as in ``watched``; a repeated name
        as made distinct, ``"name#1"``...: see the class docstring) or the
        parameter tensor itself. The values are its param group's current ones (so a
        scheduler's new ``lr``, or a ``betas`` it set, is seen before the
        step), then its matching ``for`` rules, as the step computes them:
        ``{hyper: float}`` for every hyper of the program, plus ``row_block``
        (an int) if a rule of the program sets it. Nothing is changed or
        range-checked (the step checks).

        Raises:
            ValueError: naming ``name_or_param`` if it is not one of this
                optimizer's parameters; or from
                ``betas`` and ``beta1`` / ``beta2`` both changed and disagreeing.
        """
        found = []
        flat = -1
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                flat += 1
                if (p is name_or_param if isinstance(name_or_param, torch.Tensor)
                        else self._param_name(gi, pi, flat) == name_or_param):
                    found.append((gi, pi, p))
        if len(found) != 1:
            what = (f"parameter {name_or_param!r}" if isinstance(name_or_param, str)
                    else f"tensor of shape {tuple(name_or_param.shape)}"
                    if isinstance(name_or_param, torch.Tensor) else repr(name_or_param))
            raise ValueError(f"{what} is not one of this optimizer's parameters" if not found
                             else f"{what} is ambiguous: {len(found)} parameters have this name")
        gi, pi, p = found[0]
        rules = self._rules_of(gi, pi, p)
        names = self.program.hyper_names
        group = {k: float(self.param_groups[gi][k]) for k in names}
        plan = self._betas_plan()
        if plan:
            group["beta1"], group["beta2"] = plan[gi]
        got = hyper_values(self.program.rules, rules.matching, rules.info, group, rules.explicit)
        out: dict[str, Any] = {k: float(got[k]) for k in names}
        if any(t == "row_block" for r in self.program.rules for t, _ in r.assigns):
            out["row_block"] = rules.row_block
        return out

    # ---------------------------------------------------------------- step
    @torch._dynamo.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Update every parameter that has a gradient; returns ``closure()``'s loss.

        Everything (hyper ranges, parameters, gradients, state) is checked
        before anything is modified, so a step that raises leaves
        parameters, gradients and state as they were. Under
        ``nonfinite="skip"`` a step whose gradients hold a NaN or an
        infinity changes no parameter or state and adds one to
        :attr:`skipped_steps` (decided on the device; see the class
        docstring). Under an outer
        ``torch.compile`` the step runs as its own (compiled or eager) code,
        outside the outer graph.

        Raises:
            ValueError: a group's hyper value outside its range, ``betas``
                and ``beta1`` / ``beta2`` both changed and disagreeing, an
                unsupported parameter, a sparse or mismatched gradient (for
                a DTensor parameter: one not sharded like it), a DTensor
                parameter with a layout other than Shard over one mesh
                dimension / Replicate, a parameter whose shape changed since
                its state was created, or a state value that does not fit.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        betas = self._betas_plan()
        self._check_groups()
        self._sync_betas(betas)
        bs = self._buckets
        scan = bs.scan(self.param_groups, self._rules_of, self.state, self._param_name,
                       self._check_entries, self._hypers_of)
        if not scan.active:
            return loss
        prepared = bs.apply(scan, self.state)
        buckets = [b for b, _ in prepared]
        shards = [b.shards() for b in buckets]
        combine = Combiner(shards) if any(shards) else None
        runner = self._runner
        inits = [(b, m) for b, m in prepared if m is not None]
        if inits:
            runner.run("init", [b for b, _ in inits], [self._env(b) for b, _ in inits],
                       [m for _, m in inits], combine and Combiner([b.shards() for b, _ in inits]))
            for b, m in inits:
                b.T.masked_fill_(m, 0)
        t_now = [b.T + 1 for b in buckets]
        envs = [self._env(b, t) for b, t in zip(buckets, t_now)]
        for b, t in zip(buckets, t_now):
            if b.precision == "stochastic":
                key = _precision.segment_keys(_precision.seed_key(self._rounding_seed), b.PID, t)
                b.round_key = key[b.seg].unsqueeze(1)
        actives = [b.active for b in buckets]
        acts = None
        if self._nonfinite == "skip":
            # decided on the device: every write of this step is masked by it
            bad = any_nonfinite(buckets, shards)
            ok = [~bad.to(b.device) for b in buckets]
            actives = [b.active & k for b, k in zip(buckets, ok)]
            acts = [b.active_chunks & k for b, k in zip(buckets, ok)]
            if self.skipped_steps.device != bad.device:
                self.skipped_steps = self.skipped_steps.to(bad.device)
            self.skipped_steps.add_(bad)
        if "reduce" in runner.procs:
            values = runner.globals(buckets, envs, actives, combine, acts)
            for b, env in zip(buckets, envs):
                env.update({name: v.to(device=b.device, dtype=b.cdtype)
                            for name, v in zip(runner.lowered.global_names, values)})
        outputs = runner.run("update", buckets, envs, actives, combine, acts)
        for b, t, a in zip(buckets, t_now, actives):
            b.T.copy_(torch.where(a, t, b.T))
        bs.finish()
        self._steps += 1
        record = self._record
        if self.program.watches and (record == "latest" or record[0] == "history"
                                     or self._steps % record[1] == 0):
            for b, vec in zip(buckets, outputs):
                names = [s.name for s, on in zip(b.slots, b.active_key) if on]
                index = [s.index for s, on in zip(b.slots, b.active_key) if on]
                values = torch.stack([torch.broadcast_to(torch.as_tensor(
                    v, dtype=b.cdtype, device=b.device), (b.P,)) for v in vec])
                self._add_pending(names, values[:, index])
        return loss

    def _add_pending(self, names: list[str], values: torch.Tensor) -> None:
        """Hold one recorded step's values of ``names`` (a column each of
        ``values``); under a bounded policy drop the columns (and tensors) it
        makes older than the policy keeps."""
        entry = self._entries
        self._entries += 1
        self._pending[entry] = [names, values, len(names)]
        if self._record != "latest" and self._record[0] == "every":
            return
        bound = 1 if self._record == "latest" else self._record[1]
        pending, of = self._pending, self._pending_of
        for col, name in enumerate(names):
            last = of.get(name)
            if last is None:
                last = of[name] = deque()
            last.append((entry, col))
            if len(last) > bound:
                old, _ = last.popleft()
                held = pending[old]
                held[2] -= 1
                if held[2] == 0:
                    del pending[old]

    def _env(self, b, t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        numbers = {"rows": b.ROWS, "cols": b.COLS, "ndim": b.NDIM}
        env = {"numel": b.NUMEL, **dict(zip(self.program.hyper_names, b.H)), **b.L, **b.CS,
               **{ph: numbers[n] for ph, n in self._runner.lowered.param_inputs}}
        if t is not None:
            env["t"] = t
        return env

    def _hypers_of(self, group_values: tuple, gi: int, rules: ParamRules,
                   where: Callable[[], str]) -> tuple[float, ...]:
        """A parameter's hyper values this step (LANGUAGE.md section 11), shared
        by parameters with equal rules and computed once per group values.

        Raises:
            ValueError: a value outside its hyper's range after the rules
                (naming the parameter, ``where()``).
        """
        values, cache = self._hyper_cache
        if values != group_values:
            cache = {}
            self._hyper_cache = (group_values, cache)
        key = (gi, rules.key)
        out = cache.get(key)
        if out is None:
            names = self.program.hyper_names
            got = hyper_values(self.program.rules, rules.matching, rules.info,
                               dict(zip(names, group_values[gi])), rules.explicit)
            out = tuple(got[k] for k in names)
            for k, v in zip(names, out):
                h = self.program.hyper(k)
                if not h.admits(v):
                    raise ValueError(f"parameter {where()}: {k}={v!r} after its for rules is "
                                     f"outside its range {h.range}")
            cache[key] = out
        return out

    def _check_groups(self) -> None:
        """Every group's hyper values within their ranges (changes nothing)."""
        for gi, group in enumerate(self.param_groups):
            for k in self.program.hyper_names:
                h = self.program.hyper(k)
                if not h.admits(float(group[k])):
                    raise ValueError(f"param group {gi}: {k}={group[k]!r} is outside its range "
                                     f"{h.range}")

    def _check_entries(self, p: torch.Tensor, entries: dict, where: str,
                       rules: ParamRules) -> None:
        """A state dict for ``p`` (loaded, or assigned by the user) must have
        exactly this program's keys, each fitting (``validate.check_state_entry``;
        row and col states one number per row or column after ``rules``'
        ``row_block``)."""
        lowered = self._runner.lowered
        kinds = dict(zip(lowered.state_names, lowered.state_kinds))
        rows, cols = unit_shape(p.shape, rules.row_block)
        expected = {"step", *kinds}
        # the master copy of precision "master": optional (made from p when
        # missing), and not used by other precisions or parameter dtypes
        if "master" not in kinds:
            kinds["master"] = "elem"
        unknown = sorted(set(entries) - expected - {"master"})
        missing = sorted(expected - set(entries))
        if unknown or missing:
            raise ValueError(f"the state of parameter {where} has "
                             + (f"unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}"
                                if unknown else "")
                             + (" and " if unknown and missing else "")
                             + (f"no {', '.join(map(repr, missing))}" if missing else "")
                             + f"; this program's state is: {', '.join(sorted(expected))}")
        for k, v in entries.items():
            kind = None if k == "step" else kinds[k]
            check_state_entry(p, k, v, kind, where, (rows,) if kind == "row" else (cols,))

    # ---------------------------------------------------------------- watched
    @property
    def watched(self) -> dict[str, dict[str, list[float]]]:
        """``{watched name: {parameter name: [floats, oldest first]}}``, as the
        ``record`` policy keeps them (see the class docstring).

        Values are kept on the device until this is read (then one transfer
        per recorded step still held)."""
        if self._pending:
            bounded = self._record == "latest" or self._record[0] == "history"
            wanted = None
            if bounded:      # the (entry, column)s the policy still returns
                wanted = {ec for last in self._pending_of.values() for ec in last}
            for entry, (names, values, _) in self._pending.items():
                rows = values.to(torch.float64).tolist()
                for n, row in zip(self.program.watches, rows):
                    record = self._watched.setdefault(n, {})
                    for col, (name, x) in enumerate(zip(names, row)):
                        if wanted is None or (entry, col) in wanted:
                            record.setdefault(name, []).append(x)
            self._pending.clear()
            self._pending_of.clear()
            if bounded:
                keep = 1 if self._record == "latest" else self._record[1]
                for per in self._watched.values():
                    for series in per.values():
                        if len(series) > keep:
                            del series[:-keep]
        return self._watched

    @watched.setter
    def watched(self, value: dict) -> None:
        self._pending.clear()
        self._pending_of.clear()
        self._watched = value

    @property
    def record(self) -> str | tuple[str, int]:
        """The recording policy of ``watched``: ``"latest"``, ``("every", k)``
        or ``("history", n)``."""
        return self._record

    # ---------------------------------------------------------------- state_dict
    @property
    def nonfinite(self) -> str:
        """The policy for non-finite gradients: ``"none"`` or ``"skip"`` (see
        the class docstring)."""
        return self._nonfinite

    @property
    def precision(self) -> str:
        """What a step does with 16-bit parameters: ``"master"``,
        ``"stochastic"`` or ``"nearest"`` (see the class docstring)."""
        return self._precision

    @property
    def rounding_seed(self) -> int:
        """The seed of ``precision="stochastic"``'s random bits."""
        return self._rounding_seed

    def state_dict(self) -> dict[str, Any]:
        """The state dict (torch semantics), after making ``betas`` and ``beta1``
        / ``beta2`` agree in every group as a step would. Under
        ``nonfinite="skip"`` it also holds ``"skipped_steps"`` (a 0-d int64
        tensor, a copy of :attr:`skipped_steps`), under
        ``precision="stochastic"`` ``"rounding_seed"`` (an int); otherwise it
        has only torch's keys, ``"state"`` and ``"param_groups"``. Under
        ``precision="master"`` the state of a 16-bit parameter holds its
        float32 master copy, ``"master"``.

        Raises:
            ValueError: both forms changed since the last step and disagree.
        """
        self._sync_betas()
        out = super().state_dict()
        if self._nonfinite == "skip":
            out["skipped_steps"] = self.skipped_steps.clone()
        if self._precision == "stochastic":
            out["rounding_seed"] = self._rounding_seed
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (torch semantics), keeping state in the compute dtype.

        Everything is checked first: every saved param group must have a
        value in range for each of this program's hypers (other keys, such as
        a scheduler's ``initial_lr``, are kept; a saved ``betas`` must agree
        with ``beta1`` / ``beta2``, and is added if missing); every parameter's saved state
        must have exactly this program's keys (``step`` and its states), elem
        states the parameter's shape (and layout, for DTensors), layer states
        and ``step`` one number each (``step`` a whole number >= 0). The state is
        copied into the runtime's buffers at the next step; the given
        ``state_dict`` is never modified or aliased. ``watched`` starts
        afresh (and ``record``'s step count from the largest saved ``step``):
        its history is not part of the state dict (and
        ``torch.distributed.checkpoint``'s ``get_state_dict`` may run a step
        with ``lr = 0`` on a fresh optimizer to create state before loading).

        NumPy arrays and scalars among the state values are converted to
        tensors (copies; torch's own ``load_state_dict`` would fail on them).
        A ``"skipped_steps"`` entry (see :attr:`skipped_steps`) is restored;
        without one the count starts at 0. A ``"rounding_seed"`` entry
        becomes :attr:`rounding_seed` (without one it stays as it is). A
        parameter's ``"master"`` (``precision="master"``) is optional: when
        it is missing the master is made from the parameter at the next step;
        it is not used under other precisions or for float32 and float64
        parameters.

        Raises:
            ValueError: naming the parameter and the key that does not fit,
                a state dict that is not a dict with ``state`` and
                ``param_groups``, or a ``skipped_steps`` that is not a whole
                number >= 0, or a ``rounding_seed`` that is not a whole number
                in ``[0, 2**63)``; nothing is changed then.
        """
        if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
                and isinstance(state_dict.get("param_groups"), (list, tuple))
                and all(isinstance(g, dict) and isinstance(g.get("params"), (list, tuple))
                        for g in state_dict["param_groups"])):
            raise ValueError("not an optimizer state dict: expected a dict with 'state' (a dict "
                             "of per-parameter dicts) and 'param_groups' (a list of dicts, each "
                             "with a 'params' list)")
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        mine = [p for g in self.param_groups for p in g["params"]]
        if len(saved) != len(mine):
            raise ValueError(f"the state dict has {len(saved)} parameters, this optimizer "
                             f"{len(mine)}")
        where = [(gi, pi) for gi, g in enumerate(self.param_groups) for pi in range(len(g["params"]))]
        state = dict(state_dict["state"])
        for index, (sid, p) in enumerate(zip(saved, mine)):
            entry = state.get(sid)
            if entry is None:
                continue
            label = str(index)
            if not isinstance(entry, dict):
                raise ValueError(f"the state of parameter {label} is a {type(entry).__name__}, "
                                 f"not a dict of its state values")
            if entry:
                entry = state[sid] = {k: _from_numpy(v) for k, v in entry.items()}
                self._check_entries(p, entry, label, self._rules_of(*where[index], p))
        skipped = state_dict.get("skipped_steps", 0)
        try:
            count = _number_of(skipped)
        except (TypeError, ValueError, RuntimeError):
            count = None
        if count is None or not (math.isfinite(count) and count >= 0 and count == int(count)):
            raise ValueError(f"skipped_steps of the state dict is {skipped!r}; it must be a whole "
                             f"number >= 0 (a number or a one-element tensor)")
        seed = self._rounding_seed
        if "rounding_seed" in state_dict:
            seed = _precision.check_seed(state_dict["rounding_seed"],
                                         "rounding_seed of the state dict")
        state_dict = {**state_dict, "state": state}
        for gi, group in enumerate(state_dict["param_groups"]):
            missing = [k for k in self.program.hyper_names if k not in group]
            if missing:
                raise ValueError(f"param group {gi} of the state dict has no "
                                 f"{', '.join(map(repr, missing))}: it was not saved by a "
                                 f"'{self.program.name}' optimizer (its hypers: "
                                 f"{', '.join(self.program.hyper_names)})")
            self._check_hypers({k: group[k] for k in (*self.program.hyper_names,
                                                      *("betas",) * self._has_betas)
                                if k in group}, f"param group {gi} of the state dict")
        super().load_state_dict(state_dict)
        self._betas_synced = []
        self._sync_betas()
        self.watched = {n: {} for n in self.program.watches}
        self._steps = _largest_step(state_dict["state"].values())
        self.skipped_steps.fill_(int(count))
        self._rounding_seed = seed
        for sid, p in zip(saved, mine):
            entry = state_dict["state"].get(sid)
            if not entry:
                continue
            dtype = compute_dtype(p.dtype)
            self.state[p] = {k: (v.to(device=p.device, dtype=dtype, copy=True)
                                 if isinstance(v, torch.Tensor) else v)
                             for k, v in entry.items()}

