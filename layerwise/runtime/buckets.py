"""The buckets of one optimizer: which parameters are laid out where, kept in sync.

:class:`BucketSet` decides, every step, which parameters are members of
which bucket (``layerwise.runtime.layout``): every parameter that has a
gradient now or state from before, grouped by dtype and device. Each step
has two phases:

* :meth:`BucketSet.scan` checks everything (``layerwise.runtime.validate``)
  and notes, on the slots, what this step must do; it changes nothing the
  user owns, so a step that raises leaves everything as it was;
* :meth:`BucketSet.apply` builds buckets again when members join or change
  dtype or device (moving their state into the new buffers) and makes the
  buffers hold what the user's tensors hold: re-adopts or copies in
  parameters that left their views, copies in gradients that are not the
  buffers' views and state tensors the user replaced
  (``opt.state[p]["m"] = ...``, ``load_state_dict``), and fills the
  per-parameter vectors (hypers, the active mask).

After the step, :meth:`BucketSet.finish` copies packed parameters back.
In the steady state (every parameter still its view, gradients in place or
fresh, state untouched, hypers unchanged) the per-parameter work is a few
attribute reads: the rest is per bucket.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch

from .distributed import is_dtensor, like, like_rows, local, shard_group
from .layout import Bucket, Slot, unit_chunk, unit_shape
from .validate import check_grad, check_param

__all__ = ["Member", "Scan", "BucketSet"]


@dataclass(eq=False)
class Member:
    """A parameter joining a bucket: its name, process group (sharded), param
    group, ``for`` rules (``optimizer.ParamRules``) and this step's hyper values."""
    param: torch.Tensor
    name: str
    group: object
    gi: int
    rules: object
    hypers: tuple
    pid: int = 0


@dataclass
class Scan:
    """What :meth:`BucketSet.scan` found: the step's number, hyper values per
    param group, the parameters that join, and whether to lay out again."""
    stamp: int
    group_values: tuple
    joining: list[Member] = field(default_factory=list)
    relayout: bool = False
    active: bool = False


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; on CUDA without making the host wait (pinned
    memory, a non-blocking copy). These are the step's only host to device
    copies: hypers and the active mask, when they change."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def bucket_key(p: torch.Tensor, block: int = 1, units: bool = False) -> tuple:
    """Parameters sharing a bucket: same dtype, same device; on the unit layout
    also the same number of columns (after ``row_block``, ``block``)."""
    lp = local(p)
    if units:
        return (lp.dtype, lp.device, unit_shape(p.shape, block)[1])
    return (lp.dtype, lp.device)


class BucketSet:
    """The buckets of one optimizer, for a program with the given states (and
    their kinds) and hypers, laid out in chunks of ``chunk`` elements (the
    runner's) or, with ``units``, one row per chunk (LANGUAGE.md section 10);
    ``precision``: what a step does with 16-bit parameters
    (``layerwise.runtime.precision``). Under ``"master"`` each 16-bit
    parameter's master copy follows the parameter whenever the user changes
    it: it is set from the parameter when the parameter joins, when its state
    is loaded without a master, and, when the parameter was replaced or
    changed in place (its version counter moved) and no longer is the
    master rounded to nearest, from the parameter."""

    def __init__(self, state_names: tuple[str, ...], state_kinds: tuple[str, ...],
                 hyper_names: tuple[str, ...], chunk: int, inputs: tuple[str, ...] = (),
                 units: bool = False, precision: str = "nearest"):
        self.precision = precision
        self.state_names, self.state_kinds = state_names, state_kinds
        self.units = units
        self.chunk = chunk
        #: extra per-element inputs (an adaptation's ``u``) and, for this step,
        #: each parameter's tensor of them (set by the caller before a step)
        self.inputs = inputs
        self.feed: dict[str, dict[torch.Tensor, torch.Tensor]] = {}
        self.hyper_names = hyper_names
        self.buckets: dict[tuple, Bucket] = {}
        self.slot_of: dict[torch.Tensor, tuple[Bucket, Slot]] = {}
        self._stamp = 0

    # ------------------------------------------------------------ scan
    def scan(self, param_groups: list[dict], rules_of: Callable, state: dict,
             name_of: Callable[[int, int, int], str],
             check_entries: Callable[[torch.Tensor, dict, str, object], None],
             hypers_of: Callable) -> Scan:
        """Check every parameter, gradient and state entry; note on each slot
        this step's gradient and what must be copied in. Changes nothing the
        user owns.

        ``name_of(gi, pi, flat)`` names a parameter for messages;
        ``check_entries(p, entries, name, rules)`` validates a state dict that is
        not this runtime's own views; ``rules_of(gi, pi, p)`` gives a
        parameter's ``for`` rules and ``hypers_of(group_values, gi, rules,
        where)`` (and checks) its hyper values this step.

        Raises:
            ValueError: from ``layerwise.runtime.validate`` (naming the
                parameter), or a parameter whose shape changed since its
                state was created.
        """
        self._stamp += 1
        scan = Scan(self._stamp, tuple(tuple(float(g[k]) for k in self.hyper_names)
                                       for g in param_groups))
        flat = -1
        for gi, group in enumerate(param_groups):
            for pi, p in enumerate(group["params"]):
                flat += 1
                g = p.grad
                pr = rules_of(gi, pi, p)
                hv = hypers_of(scan.group_values, gi, pr,
                               lambda gi=gi, pi=pi, flat=flat: name_of(gi, pi, flat))
                found = self.slot_of.get(p)
                if found is None:
                    entries = state.get(p)
                    if g is None and not entries:
                        continue
                    name = name_of(gi, pi, flat)
                    check_param(p, name)
                    self._check_not_ours(local(p), name)
                    if g is not None:
                        check_grad(p, g, name)
                    if entries:
                        check_entries(p, entries, name, pr)
                    if self.units:
                        Bucket.local_rows(p, local(p), name, pr.row_block)
                    scan.joining.append(Member(p, name, shard_group(p, name)
                                               if is_dtensor(p) else None, gi, pr, hv, flat))
                    scan.active |= g is not None
                    continue
                b, slot = found
                slot.stamp, slot.grad_now, slot.hypers = scan.stamp, g, hv
                scan.active |= g is not None
                if slot.adopted:
                    same = p.data_ptr() == slot.ptr and p.shape == slot.shape
                else:       # packed: the tensor it was last checked as
                    lp = local(p)
                    same = slot.seen == (lp.data_ptr(), lp.shape, lp.stride(), lp.dtype,
                                         lp.device)
                if not same:
                    name = name_of(gi, pi, flat)
                    check_param(p, name)
                    lp = local(p)
                    if not slot.adopted or not b.is_adopted_view(slot):
                        self._check_not_ours(lp, name)
                    if tuple(lp.shape) != slot.shape:
                        raise ValueError(f"parameter {name} has shape {tuple(p.shape)}, but "
                                         f"its state was made for shape {tuple(slot.param_shape)};"
                                         " give the optimizer a parameter of the same shape")
                    slot.moved = True
                    slot.recheck = True
                    slot.seen = (lp.data_ptr(), lp.shape, lp.stride(), lp.dtype, lp.device)
                    if (lp.dtype, lp.device) != (b.dtype, b.device):
                        scan.relayout = True
                elif b.M is not None and local(p)._version != slot.version:
                    slot.recheck = True          # changed in place (e.g. load_state_dict)
                if g is not None and g is not slot.g:
                    check_grad(p, g, name_of(gi, pi, flat))
                entries = state.get(p)
                if entries is not slot.entries or (entries is not None
                                                   and not self._intact(slot, entries)):
                    if entries:
                        check_entries(p, entries, name_of(gi, pi, flat), pr)
                    slot.foreign = True
        return scan

    def _check_not_ours(self, t: torch.Tensor, name: str) -> None:
        if t.numel() and any(b.owns_memory(t) for b in self.buckets.values()):
            raise ValueError(f"parameter {name} shares memory with another parameter of this "
                             "optimizer (e.g. p.data = other.data after the optimizer was made);"
                             " give each parameter its own tensor")

    @staticmethod
    def _intact(slot: Slot, entries: dict) -> bool:
        return len(entries) == len(slot.entry_values) and \
            all(map(operator.is_, entries.values(), slot.entry_values))

    # ------------------------------------------------------------ apply
    def apply(self, scan: Scan, state: dict) -> list[tuple[Bucket, torch.Tensor | None]]:
        """Make the buffers hold this step's parameters, gradients and state
        (after :meth:`scan` passed); returns, per bucket, the mask of
        parameters whose state must be initialised now (``(P,)`` bool on the
        bucket's device, or None)."""
        if scan.joining or scan.relayout:
            self._relayout(scan, state)
        out = []
        for b in self.buckets.values():
            if any(s.moved and s.adopted and not b.is_adopted_view(s) and not b.slot_free(s.w)
                   for s in b.slots):
                b.fresh_param_buffer()       # someone holds a view of a left slot
            init, fresh, flags = [], [], []
            for slot in b.slots:
                active = slot.stamp == scan.stamp and slot.grad_now is not None
                flags.append(active)
                if slot.foreign:
                    entries = state.get(slot.param)
                    if entries:
                        self._copy_state(slot, entries)
                        self._install(b, slot, state)
                    else:
                        slot.entries, slot.entry_values = entries, []
                        slot.resync = True       # state cleared: made again from p
                    slot.foreign = False
                if b.M is not None:
                    self._sync_master(b, slot)
                if not active:
                    continue
                if not slot.entry_values:
                    init.append(slot.index)
                if slot.moved:
                    self._sync_param(b, slot)
                elif not slot.adopted and slot.numel:
                    slot.w.copy_(local(slot.param))
                if slot.grad_now is not slot.g and slot.numel:
                    fresh.append(slot)
            self._copy_grads(b, fresh)
            for name, per_param in self.feed.items():
                active = [s for s, on in zip(b.slots, flags) if on and s.numel]
                if active:
                    torch._foreach_copy_([s.inputs[name] for s in active],
                                         [local(per_param[s.param]) for s in active])
            self._set_hypers(b)
            self._set_active(b, tuple(flags))
            mask = None
            if init:
                mask = torch.zeros(b.P, dtype=torch.bool)
                mask[init] = True
                mask = _to_device(mask, b.device)
                for i in init:
                    self._install(b, b.slots[i], state)
            if b.M is not None:
                self._note_versions(b, b.slots)
            out.append((b, mask))
        return out

    @staticmethod
    def _sync_master(b: Bucket, slot: Slot) -> None:
        """Set the slot's master copy from its parameter when it must follow it
        (see the class docstring)."""
        if not (slot.resync or slot.recheck) or not slot.numel:
            slot.resync = slot.recheck = False
            return
        master, p = slot.states["master"], local(slot.param)
        if slot.resync or not torch.equal(master.to(b.dtype), p):
            master.copy_(p)
        slot.resync = slot.recheck = False

    @staticmethod
    def _note_versions(b: Bucket, slots) -> None:
        for slot in slots:
            slot.version = local(slot.param)._version

    def _relayout(self, scan: Scan, state: dict) -> None:
        """Lay out every member again (joining ones included), keeping each
        one's state (converted to its new compute dtype and device) and
        adopting what can be adopted."""
        members: dict[tuple, list[tuple[Member, Slot | None]]] = {}
        for _, slot in self.slot_of.values():
            m = Member(slot.param, slot.name, slot.group, slot.gi, slot.rules, slot.hypers,
                       slot.pid)
            members.setdefault(self._key(m), []).append((m, slot))
        for m in scan.joining:
            members.setdefault(self._key(m), []).append((m, None))
        self.buckets, self.slot_of = {}, {}
        for key, items in members.items():
            chunk = unit_chunk(key[2]) if self.units else self.chunk
            b = Bucket([(m.param, m.name, m.group) for m, _ in items], self.state_names,
                       self.state_kinds, len(self.hyper_names), chunk, self.inputs,
                       self.units, [m.rules.row_block for m, _ in items], self.precision,
                       [m.pid for m, _ in items])
            self.buckets[key] = b
            for slot, (m, old) in zip(b.slots, items):
                self.slot_of[slot.param] = (b, slot)
                slot.gi, slot.rules, slot.hypers = m.gi, m.rules, m.hypers
                slot.stamp = scan.stamp if old is None else old.stamp
                if old is not None:
                    slot.recheck = old.recheck or old.moved
                slot.grad_now = slot.param.grad if old is None else old.grad_now
                entries = state.get(slot.param)
                if old is not None and entries and entries is old.entries and \
                        self._intact(old, entries):
                    self._copy_state(slot, entries)          # ours: carry it over
                    self._install(b, slot, state)
                else:
                    slot.foreign = bool(entries)
                b.adopt(slot)

    def _key(self, m: Member) -> tuple:
        return bucket_key(m.param, m.rules.row_block, self.units)

    def finish(self) -> None:
        """After the step: copy packed parameters back, bump the version of
        adopted ones (as an in-place update would)."""
        adopted, noted = [], []
        for b in self.buckets.values():
            if b.M is not None:
                noted.append(b)
            copy_to, copy_from = [], []
            for slot, on in zip(b.slots, b.active_key):
                if not on:
                    continue
                if slot.adopted:
                    adopted.append(slot.param)
                elif slot.numel:
                    copy_to.append(local(slot.param))
                    copy_from.append(slot.w)
            if copy_to:
                torch._foreach_copy_(copy_to, copy_from)
        if adopted:
            torch._C._autograd._unsafe_set_version_counter(
                tuple(adopted), tuple(p._version + 1 for p in adopted))
        for b in noted:
            self._note_versions(b, [s for s, on in zip(b.slots, b.active_key) if on])

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _install(b: Bucket, slot: Slot, state: dict) -> None:
        """Make ``state[p]`` hold the slot's views (the same dict object if it
        has one, so references to it stay valid)."""
        entries = state.get(slot.param)
        if not isinstance(entries, dict):
            entries = {}
        entries.clear()
        entries.update(b.state_entries(slot, like, like_rows))
        state[slot.param] = slot.entries = entries
        slot.entry_values = list(entries.values())

    @staticmethod
    def _copy_state(slot: Slot, entries: dict) -> None:
        """Copy a state dict's values into the slot's views. A ``"master"`` view
        without a value in ``entries`` is set from the parameter later
        (``slot.resync``); a ``"master"`` value without a view (a parameter
        that is not 16-bit, or another precision) is not used."""
        for k, view in slot.states.items():
            if k == "master":
                slot.resync = "master" not in entries
                if slot.resync:
                    continue
            value = entries[k]
            if isinstance(value, torch.Tensor):
                value = local(value)
                view.copy_(value.reshape(view.shape) if view.dim() == 0 else value)
            else:
                view.fill_(float(value))

    @staticmethod
    def _sync_param(b: Bucket, slot: Slot) -> None:
        slot.moved = False
        if slot.adopted and b.is_adopted_view(slot):
            return
        slot.adopted = False
        if not b.adopt(slot) and slot.numel:
            slot.w.copy_(local(slot.param))

    @staticmethod
    def _copy_grads(b: Bucket, fresh: list[Slot]) -> None:
        if not fresh:
            return
        if not b.grad_buffer_free(fresh):
            b.fresh_grad_buffer()
        if b.grads_exposed:
            torch._foreach_copy_([s.g for s in fresh], [local(s.grad_now) for s in fresh])
        else:
            # the buffer's first use: copy and hand out one view at a time, so each
            # old gradient can be freed before the next one is copied
            for s in fresh:
                s.g.copy_(local(s.grad_now))
                if s.adopted:
                    s.param.grad = s.g
                    s.grad_now = s.g
        for s in fresh:
            if s.adopted:
                s.param.grad = s.g
                s.grad_now = s.g
                b.grads_exposed = True

    def _set_hypers(self, b: Bucket) -> None:
        """Fill ``H`` with the slots' hyper values when any changed (the values
        are shared tuples: comparing them is mostly identity checks)."""
        key = tuple(slot.hypers for slot in b.slots)
        if key == b.hyper_key or not self.hyper_names:
            b.hyper_key = key
            return
        rows = [*key, *[(0.0,) * len(self.hyper_names)] * b.dummies]   # the dummy segments
        b.H.copy_(_to_device(torch.tensor(rows, dtype=b.cdtype).T.contiguous(), b.device))
        b.hyper_key = key

    @staticmethod
    def _set_active(b: Bucket, flags: tuple) -> None:
        if flags != b.active_key:
            b.active.copy_(_to_device(torch.tensor(list(flags) + [False] * b.dummies,
                                                   dtype=torch.bool), b.device))
            b.active_chunks = b.active[b.seg].unsqueeze(1)
            b.active_key = flags
