"""The buckets of one optimizer: which parameters are laid out where, kept in sync.

:class:`BucketSet` decides, every step, which parameters are members of
which bucket (``layerwise.runtime.layout``): every parameter that has a
gradient now or state from before, grouped by dtype and device. It builds
a bucket again when its members change (moving their state into the new
buffers) and, before each step, makes the buffers hold what the user's
tensors hold: re-adopts or copies in parameters that left their views,
copies in gradients that are not the buffers' views, copies in state
tensors the user replaced (``opt.state[p]["m"] = ...``,
``load_state_dict``), and fills the per-parameter vectors (hypers, the
active mask). After the step it copies packed parameters back.

Nothing here validates: the optimizer checks everything first
(``layerwise.optimizer``), so these changes only run on input that fits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import like, local
from .layout import Bucket, Slot, compute_dtype

__all__ = ["Work", "BucketSet"]


@dataclass(eq=False)
class Work:
    """One parameter of this step: its name, process group (sharded), hyper
    values (after rules and groups) and whether it has a gradient."""
    param: torch.Tensor
    name: str
    group: object
    hypers: tuple[float, ...]
    active: bool


def bucket_key(p: torch.Tensor) -> tuple:
    """Parameters sharing a bucket: same dtype, same device."""
    lp = local(p)
    return (lp.dtype, lp.device)


class BucketSet:
    """The buckets of one optimizer, for a program with the given states and hypers."""

    def __init__(self, state_names: tuple[str, ...], layer_states: tuple[bool, ...],
                 hyper_names: tuple[str, ...]):
        self.state_names, self.layer_states = state_names, layer_states
        self.hyper_names = hyper_names
        self.buckets: dict[tuple, Bucket] = {}
        self.slot_of: dict[torch.Tensor, tuple[Bucket, Slot]] = {}

    # ------------------------------------------------------------ membership
    def members_changed(self, work: list[Work], state: dict) -> bool:
        """Whether a bucket must be built again: a parameter joins (first
        gradient, or loaded state) or changed dtype, device or shape."""
        for w in work:
            found = self.slot_of.get(w.param)
            if found is None:
                if w.active or state.get(w.param):
                    return True
                continue
            bucket, slot = found
            lp = local(w.param)
            if (lp.dtype, lp.device) != (bucket.dtype, bucket.device) or \
                    tuple(lp.shape) != slot.shape:
                return True
        return False

    def rebuild(self, work: list[Work], state: dict) -> None:
        """Lay out every member again, keeping each one's state (converted to
        its new compute dtype and device) and adopting what can be adopted."""
        groups: dict[tuple, list[Work]] = {}
        for w in work:
            if w.param in self.slot_of or w.active or state.get(w.param):
                groups.setdefault(bucket_key(w.param), []).append(w)
        old = self.slot_of
        self.buckets, self.slot_of = {}, {}
        for key, members in groups.items():
            b = Bucket([(w.param, w.name, w.group) for w in members], self.state_names,
                       self.layer_states, len(self.hyper_names))
            self.buckets[key] = b
            for slot in b.slots:
                self.slot_of[slot.param] = (b, slot)
                previous = old.get(slot.param)
                entries = state.get(slot.param)
                if previous is not None and entries is previous[1].entries:
                    self._copy_state(slot, entries)          # ours: carry it over
                    self._install(b, slot, state)
                b.adopt(slot)

    # ------------------------------------------------------------ per step
    def prepare(self, work: list[Work], state: dict) -> list[tuple[Bucket, torch.Tensor]]:
        """Make the buffers hold this step's parameters, gradients and state;
        returns, per bucket, the mask of parameters whose state must be
        initialised now (``(P,)`` bool, or None)."""
        per_bucket: dict[Bucket, list[Work]] = {b: [] for b in self.buckets.values()}
        for w in work:
            found = self.slot_of.get(w.param)
            if found is not None:
                per_bucket[found[0]].append(w)
        out = []
        for b, items in per_bucket.items():
            by_slot = {self.slot_of[w.param][1]: w for w in items}
            init = []
            for slot in b.slots:
                w = by_slot.get(slot)
                entries = state.get(slot.param)
                if not entries:
                    if w is not None and w.active:
                        init.append(slot.index)
                elif entries is not slot.entries or not self._intact(slot, entries):
                    self._copy_state(slot, entries)
                    self._install(b, slot, state)
                if w is not None and w.active:
                    self._sync_param(b, slot)
            self._sync_grads(b, [s for s in b.slots if by_slot.get(s) and by_slot[s].active])
            self._set_hypers(b, [by_slot[s].hypers if s in by_slot else None for s in b.slots])
            self._set_active(b, [bool(s in by_slot and by_slot[s].active) for s in b.slots])
            mask = None
            if init:
                mask = torch.zeros(b.P, dtype=torch.bool)
                mask[init] = True
                mask = mask.to(b.device)
                for i in init:
                    self._install(b, b.slots[i], state)
            out.append((b, mask))
        return out

    def finish(self) -> None:
        """After the step: copy packed parameters back, bump the version of
        adopted ones (as an in-place update would)."""
        adopted = []
        for b in self.buckets.values():
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

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _install(b: Bucket, slot: Slot, state: dict) -> None:
        """Make ``state[p]`` hold the slot's views (the same dict object if it
        has one, so references to it stay valid)."""
        entries = state.get(slot.param)
        if not isinstance(entries, dict):
            entries = {}
        entries.clear()
        entries.update(b.state_entries(slot, like))
        state[slot.param] = slot.entries = entries
        slot.entry_values = dict(entries)

    @staticmethod
    def _intact(slot: Slot, entries: dict) -> bool:
        values = slot.entry_values
        return len(entries) == len(values) and all(entries.get(k) is v for k, v in values.items())

    def _copy_state(self, slot: Slot, entries: dict) -> None:
        for k, view in slot.states.items():
            value = entries[k]
            if isinstance(value, torch.Tensor):
                value = local(value)
                view.copy_(value.reshape(view.shape) if value.numel() == 1 and view.dim() == 0
                           else value)
            else:
                view.fill_(float(value))

    @staticmethod
    def _sync_param(b: Bucket, slot: Slot) -> None:
        if slot.adopted:
            if b.is_adopted_view(slot):
                return
            slot.adopted = False
            if b.adopt(slot):
                return
        if slot.numel:
            slot.w.copy_(local(slot.param))

    @staticmethod
    def _sync_grads(b: Bucket, slots: list[Slot]) -> None:
        fresh = [s for s in slots if s.param.grad is not s.g and s.numel]
        if not fresh:
            return
        if not b.grad_buffer_free(fresh):
            b.fresh_grad_buffer()
        torch._foreach_copy_([s.g for s in fresh], [local(s.param.grad) for s in fresh])
        for s in fresh:
            if s.adopted:
                s.param.grad = s.g
                b.grads_exposed = True

    @staticmethod
    def _set_hypers(b: Bucket, values: list) -> None:
        key = tuple(values)
        if key == b.hyper_key:
            return
        rows = [v if v is not None else (0.0,) * b.H.shape[0] for v in values]
        rows.append((0.0,) * b.H.shape[0])            # the dummy segment
        if b.H.shape[0]:
            b.H.copy_(torch.tensor(rows, dtype=b.cdtype).T)
        b.hyper_key = key

    @staticmethod
    def _set_active(b: Bucket, flags: list[bool]) -> None:
        key = tuple(flags)
        if key != b.active_key:
            b.active.copy_(torch.tensor(list(key) + [False], dtype=torch.bool))
            b.active_key = key
