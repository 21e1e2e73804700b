"""The segmented flat layout: every parameter of a bucket in one set of buffers.

A bucket holds the parameters of one optimizer that share a dtype and a
device. Each parameter ("slot", "segment") owns ``ceil(numel / C)`` rows
("chunks") of ``(nchunks, C)`` buffers: ``W`` (parameters, their dtype),
``G`` (gradients), one per elem state (compute dtype); its last chunk ends
in padding, so that a chunk belongs to one parameter. Per-parameter values
are ``(P,)`` vectors: ``T`` (the step count ``t``), ``NUMEL``, one per
layer state and per hyperparameter. ``seg`` maps chunks to segments and
``valid`` counts each chunk's real elements (``layerwise.runtime.flat_ops``).
A dummy segment at the end keeps ``P >= 2``, ``nchunks >= 2`` and
``P != nchunks``, so that compiled graphs never specialise on a size.

Each slot's element order is its parameter's memory order: a slot is a
strided view of its rows with the parameter's own strides when the
parameter is non-overlapping and dense (contiguous, transposed,
channels_last, ...), and row-major otherwise. Gradients and states are
views with the same strides, so elementwise arithmetic pairs the right
elements whatever the layouts, and ``state[p]["m"]`` has ``p``'s layout
(as ``torch.zeros_like(p, memory_format=torch.preserve_format)``).

What it does to the user's tensors (README, "What layerwise does to your
tensors"):

* A parameter is *adopted* when it owns its storage alone (dense, not
  shared with any other tensor, not shared memory, not sharded): its
  ``.data`` becomes its view of ``W``, with the same values, shape and
  strides, so the step reads and writes it in place. Any other parameter is
  *packed*: copied into ``W`` before the step and back after it, so views
  of it and tensors sharing its storage see the update as with
  ``torch.optim``.
* A gradient that is not the slot's view of ``G`` is copied into ``G``;
  the parameter's ``.grad`` then becomes that view (same values), so a
  loop that zeroes gradients in place, or accumulates into them, costs no
  copy. A view handed out this way is never written again by the
  optimizer while anyone else holds it (:meth:`Bucket.grad_buffer_free`).
* Every step checks that adopted parameters still are their views (their
  ``data_ptr``, shape and strides) and gradients theirs: ``.data =``,
  ``load_state_dict(assign=True)`` with swapped tensors, ``model.to()``,
  ``zero_grad(set_to_none=True)`` and a new ``.grad`` are all detected,
  and the new tensors are copied in (and re-adopted when they qualify).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch

from .distributed import is_dtensor, local, shard_offset
from .flat_ops import PartialRows
from .precision import HALF

__all__ = ["CHUNK", "Slot", "Bucket", "dense", "compute_dtype", "unit_shape", "unit_chunk"]

#: Elements per chunk. Parameters are padded to a multiple of it. Longer rows
#: amortise each row's loop overhead in the compiled kernels (BERT-base
#: compiled lamb, same process: 1024 about 10% faster than 256, 2048 no
#: faster than 1024); the padding costs at most 1023 elements per tensor.
CHUNK = 1024


def unit_shape(shape, block: int = 1) -> tuple[int, int]:
    """``(rows, cols)`` of a parameter of ``shape`` seen as a matrix whose rows
    are ``block`` consecutive slices along dim 0 (LANGUAGE.md section 10): a
    0-d tensor is ``(1, 1)``, a bias ``(n,)`` is ``(n, 1)``, a conv weight
    ``(out, in, kh, kw)`` is ``(out, in * kh * kw)``; ``block`` divides dim 0."""
    shape = tuple(shape)
    dim0 = shape[0] if shape else 1
    return dim0 // block, block * math.prod(shape[1:])


def unit_chunk(cols: int) -> int:
    """The chunk length of the unit layout for parameters of ``cols`` columns:
    one row per chunk, at least 2 (a length-1 dimension would make compiled
    graphs specialise on it)."""
    return max(cols, 2)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and the update use for a parameter of ``dtype``.

    float32 and float64 parameters compute in their own dtype; bfloat16 and
    float16 parameters in float32 (LANGUAGE.md section 8).
    """
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _element_offset(p: torch.Tensor) -> int:
    """The index in ``p`` (row-major over its global shape) of the first element
    of this rank's shard (0 for a plain tensor)."""
    if not is_dtensor(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    strides = _contiguous_strides(tuple(p.shape))
    return int(sum(int(o) * st for o, st in zip(offset, strides)))


def dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``t.numel()`` consecutive memory slots
    (non-overlapping and dense: contiguous, transposed, channels_last, ...)."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _users(t: torch.Tensor) -> int:
    """How many tensors hold ``t``'s storage (``t`` included)."""
    storage = t.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata) - 1    # minus ``storage`` itself


def own_view(buf: torch.Tensor, shape, stride, offset: int) -> torch.Tensor:
    """A view of ``buf`` (elements from ``offset`` on, ``shape`` and ``stride``)
    with a storage object of its own that covers just its elements (through
    DLPack; on any device). Parameters, gradients and states handed to the
    user are such views: to code that groups tensors by storage (safetensors,
    accelerate's and transformers' savers drop or refuse tensors that share
    one) each is a tensor of its own, and ``torch.save`` of one writes its
    elements only. Empty views are plain views."""
    view = torch.as_strided(buf, shape, stride, buf.storage_offset() + offset)
    return torch.from_dlpack(view) if view.numel() else view


def owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is the only tensor using its storage and fills it exactly."""
    if t.numel() == 0 or not dense(t) or t.storage_offset() != 0:
        return False
    storage = t.untyped_storage()
    return (storage.nbytes() == t.numel() * t.element_size() and not storage.is_shared()
            and _users(t) == 1)


@dataclass(eq=False)
class Slot:
    """One parameter's place in a bucket (``index`` is its segment); ``rows``
    and ``cols``: its matrix after its ``row_block`` (``block``), rows of
    the whole parameter (not just this rank's shard)."""
    param: torch.Tensor
    name: str
    index: int
    chunk0: int
    nchunks: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    group: object = None            # process group of a sharded parameter
    adopted: bool = False
    w: torch.Tensor | None = None   # views of the buffers with the slot's geometry
    g: torch.Tensor | None = None
    states: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: dict | None = None     # the dict optimizer.state[p] is, when it holds our views
    entry_values: list = field(default_factory=list)  # the views it holds, in order
    ptr: int = 0                    # W's address of the slot (an adopted param's data_ptr)
    param_shape: tuple[int, ...] = ()
    # set by BucketSet.scan for this step (layerwise.runtime.buckets)
    stamp: int = -1                 # the step that last saw the parameter in a param group
    grad_now: torch.Tensor | None = None
    gi: int = 0                     # its param group, for rules and hyper values
    rules: object = None
    hypers: tuple = ()
    moved: bool = False             # its tensor is not (or no longer) its view of W
    seen: tuple = ()                # a packed parameter's tensor when last checked
    foreign: bool = False           # state[p] holds values to copy into the buffers
    block: int = 1
    rows: int = 1
    cols: int = 1
    pid: int = 0                    # its position in the optimizer (stochastic rounding)
    # under precision "master" (layerwise.runtime.precision): set the master from
    # the parameter (``resync``), or only if it does not round to it (``recheck``);
    # ``version``: the parameter's version counter when it last matched its master
    resync: bool = True
    recheck: bool = False
    version: int = -1

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Bucket:
    """The flat buffers and slots of parameters sharing a dtype and device.

    Args:
        members: ``(param, name, process group or None)`` per parameter;
            ``param`` may be a DTensor (its local shard is laid out).
        state_names, state_kinds: the program's states and their kinds:
            ``"elem"`` (shaped like the parameter), ``"layer"`` (one number
            per parameter), ``"row"`` or ``"col"`` (one per row or column).
        hyper_count: number of hyperparameters (rows of ``H``).
        chunk: elements per chunk.
        inputs: names of extra per-element inputs (an adaptation's ``u``),
            one buffer each in ``X``, filled before every step.
        units: lay out one row per chunk (LANGUAGE.md section 10: every
            member has ``chunk - pad`` columns, see :func:`unit_chunk`).
        blocks: each member's ``row_block`` (default 1).
        precision: what the step does with a 16-bit parameter
            (``layerwise.runtime.precision.PRECISIONS``); ``"nearest"`` for
            float32 and float64 buckets whatever is given. Under
            ``"master"`` the bucket has a float32 master buffer ``M`` (an
            elem state ``"master"`` of every slot); under ``"stochastic"``
            the per-segment ``PID`` and per-chunk ``round_base`` that key
            the random bits.
        pids: each member's position in the optimizer (default: its index).

    Raises:
        ValueError: on the unit layout, a sharded parameter whose local shard
            does not hold whole rows (a ``row_block`` straddling a shard
            boundary), naming the parameter.
    """

    def __init__(self, members: list[tuple[torch.Tensor, str, object]],
                 state_names: tuple[str, ...], state_kinds: tuple[str, ...],
                 hyper_count: int, chunk: int = CHUNK, inputs: tuple[str, ...] = (),
                 units: bool = False, blocks: list[int] | None = None,
                 precision: str = "nearest", pids: list[int] | None = None):
        first = local(members[0][0])
        self.dtype, self.device = first.dtype, first.device
        self.cdtype = compute_dtype(self.dtype)
        self.precision = precision if self.dtype in HALF else "nearest"
        pids = pids if pids is not None else list(range(len(members)))
        self.chunk = chunk
        self.units = units
        self.slots: list[Slot] = []
        blocks = blocks or [1] * len(members)
        c0 = 0
        for i, ((p, name, group), block) in enumerate(zip(members, blocks)):
            lp = local(p)
            n = lp.numel()
            shape = tuple(lp.shape)
            rows, cols = unit_shape(p.shape, block)
            if units:
                k = self.local_rows(p, lp, name, block)
                stride = _contiguous_strides(shape)
                if shape and cols < chunk:       # one element per row, padded
                    stride = (chunk, *stride[1:])
            else:
                stride = tuple(lp.stride()) if dense(lp) and group is None and n > 1 \
                    else _contiguous_strides(shape)
                k = -(-n // chunk)
            self.slots.append(Slot(p, name, i, c0, k, shape, stride, group,
                                   param_shape=tuple(p.shape), block=block, rows=rows,
                                   cols=cols, pid=pids[i]))
            c0 += k
        P, NC = len(self.slots) + 1, c0 + 1            # the dummy segment owns >= 1 chunk
        # no two dynamic sizes equal, so that compiled graphs never specialise
        while NC < 2 or NC == P or (units and chunk in (NC, P)):
            if units and chunk == P:
                P += 1
            else:
                NC += 1
        self.P, self.nchunks = P, NC
        self.dummies = P - len(self.slots)
        dev, cd = self.device, self.cdtype
        counts = torch.tensor([s.nchunks for s in self.slots] + [NC - c0]
                              + [0] * (self.dummies - 1), dtype=torch.int64)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(dev)
        self.seg = torch.repeat_interleave(torch.arange(P), counts).to(dev)
        valid = torch.full((NC,), chunk, dtype=torch.int64)
        for s in self.slots:
            if units:
                valid[s.chunk0:s.chunk0 + s.nchunks] = s.cols
            elif s.nchunks:
                valid[s.chunk0 + s.nchunks - 1] = s.numel - (s.nchunks - 1) * chunk
        valid[c0:] = 0
        self.valid = valid.unsqueeze(1).to(dev)
        kinds = dict(zip(state_names, state_kinds))
        # empty, then zero the padding: a slot's memory is only touched when its
        # parameter, gradient or state is copied in, so adopting a parameter
        # (whose old storage is then freed) does not grow the resident set
        self.W = self._buffer(self.dtype)
        self.G = self._buffer(self.dtype)
        self.S = {n: self._buffer(cd) for n, k in kinds.items() if k == "elem"}
        #: the float32 master copies (precision "master"), else None
        self.M = self._buffer(torch.float32) if self.precision == "master" else None
        self.X = {n: self._buffer(cd) for n in inputs}
        self.L = {n: torch.zeros(P, dtype=cd, device=dev) for n, k in kinds.items()
                  if k == "layer"}
        # row states: one number per chunk (a row); col states: a (P, C) table
        self.R = {n: torch.zeros(NC, dtype=cd, device=dev) for n, k in kinds.items()
                  if k == "row"}
        self.row_views = {n: v.unsqueeze(1) for n, v in self.R.items()}
        self.CS = {n: torch.zeros(P, chunk, dtype=cd, device=dev) for n, k in kinds.items()
                   if k == "col"}
        self.colref = torch.zeros(P, chunk, dtype=cd, device=dev) if units else None
        self.T = torch.zeros(P, dtype=cd, device=dev)
        pad = [0.0] * self.dummies
        self.NUMEL = torch.tensor([float(p.numel()) for p, _, _ in members] + pad,
                                  dtype=cd, device=dev)
        # the parameter's numbers that steps read (section 10), after row_block
        self.ROWS = torch.tensor([float(s.rows) for s in self.slots] + pad, dtype=cd, device=dev)
        self.COLS = torch.tensor([float(s.cols) for s in self.slots] + pad, dtype=cd, device=dev)
        self.NDIM = torch.tensor([float(len(s.param_shape)) for s in self.slots] + pad,
                                 dtype=cd, device=dev)
        self.H = torch.zeros(hyper_count, P, dtype=cd, device=dev)
        self.hyper_key: object = None
        self.active = torch.zeros(P, dtype=torch.bool, device=dev)
        self.active_chunks = torch.zeros(NC, 1, dtype=torch.bool, device=dev)
        self.active_key: tuple = ()
        for s in self.slots:
            s.w = self._view(self.W, s)
            s.g = self._view(self.G, s)
            s.ptr = s.w.data_ptr() if s.numel else 0
            s.states = {n: self._view(buf, s) for n, buf in self.S.items()}
            if self.M is not None:
                s.states["master"] = self._view(self.M, s)
            s.inputs = {n: self._view(buf, s) for n, buf in self.X.items()}
            s.states.update({n: own_view(vec, (), (), s.index) for n, vec in self.L.items()})
            s.states.update({n: own_view(vec, (s.nchunks,), (1,), s.chunk0)
                             for n, vec in self.R.items()})
            s.states.update({n: own_view(t, (s.cols,), (1,), s.index * chunk)
                             for n, t in self.CS.items()})
            s.states["step"] = own_view(self.T, (), (), s.index)
        self.grads_exposed = False
        by_group: dict[object, list[int]] = {}
        for s in self.slots:
            if s.group is not None:
                by_group.setdefault(s.group, []).append(s.index)
        self._shards = {g: torch.tensor(ix, dtype=torch.int64, device=dev)
                        for g, ix in by_group.items()}
        self._partial_rows: dict[int, list[PartialRows]] = {}
        if self.precision == "stochastic":
            self._round_tables(pad)

    def _round_tables(self, pad: list) -> None:
        """``PID`` ``(P,)`` int64 (each segment's position in the optimizer) and
        ``round_base`` ``(nchunks, 1)`` int64 (the index, within its whole
        parameter, of each chunk's first element: for a DTensor sharded
        along dim 0 its shard's offset included; along another dimension,
        the index of the shard's first element); ``round_key`` is set by the
        optimizer every step (``layerwise.runtime.precision``)."""
        self.PID = torch.tensor([s.pid for s in self.slots] + [0] * len(pad), dtype=torch.int64,
                                device=self.device)
        base = torch.zeros(self.nchunks, dtype=torch.int64)
        for s in self.slots:
            if not s.nchunks:
                continue
            offset = _element_offset(s.param)
            step = s.cols if self.units else self.chunk
            base[s.chunk0:s.chunk0 + s.nchunks] = torch.arange(s.nchunks) * step + offset
        self.round_base = base.unsqueeze(1).to(self.device)
        self.round_key = torch.zeros(self.nchunks, 1, dtype=torch.int64, device=self.device)

    @staticmethod
    def local_rows(p: torch.Tensor, lp: torch.Tensor, name: str, block: int) -> int:
        """Rows of ``p`` this rank holds on the unit layout (all of them unless
        ``p`` is sharded); refuses a shard that cuts a row."""
        dim0 = lp.shape[0] if lp.dim() else 1
        try:
            start = shard_offset(p)
        except ValueError as err:
            raise ValueError(f"parameter {name}: {err}") from None
        if dim0 % block or start % block:
            raise ValueError(
                f"parameter {name}: its shard on this rank holds dim-0 slices {start} to "
                f"{start + dim0 - 1}, which cuts one of its rows of row_block {block} slices; "
                "layerwise keeps a row on one rank: shard the parameter so that every shard "
                "holds whole rows (e.g. a number of ranks dividing "
                f"{(p.shape[0] if p.dim() else 1) // block}), or use a row_block of 1")
        return dim0 // block

    def partial_rows(self, block: int) -> list[PartialRows]:
        """Per block of ``block`` chunks, its rows that end in padding (the
        eager path's masks; computed once per layout)."""
        rows = self._partial_rows.get(block)
        if rows is None:
            rows = self._partial_rows[block] = [
                PartialRows.of(self.valid, s, min(s + block, self.nchunks), self.chunk)
                for s in range(0, self.nchunks, block)]
        return rows

    def shards(self) -> dict[object, torch.Tensor]:
        """The segments of sharded parameters, per process group (``(K,)`` int64)."""
        return self._shards

    def _buffer(self, dtype: torch.dtype) -> torch.Tensor:
        if self.units and any(s.cols < self.chunk for s in self.slots):
            # rows of one element: padding after each
            return torch.zeros(self.nchunks, self.chunk, dtype=dtype, device=self.device)
        buf = torch.empty(self.nchunks, self.chunk, dtype=dtype, device=self.device)
        flat = buf.view(-1)
        for s in self.slots:
            flat[s.chunk0 * self.chunk + s.numel:(s.chunk0 + s.nchunks) * self.chunk].zero_()
        end = self.slots[-1].chunk0 + self.slots[-1].nchunks if self.slots else 0
        buf[end:].zero_()
        return buf

    def _view(self, buf: torch.Tensor, s: Slot) -> torch.Tensor:
        return own_view(buf, s.shape, s.stride, s.chunk0 * self.chunk)

    # ------------------------------------------------------------ parameters
    def adopt(self, s: Slot) -> bool:
        """Make ``s``'s parameter its view of ``W`` if it owns its storage alone
        (copying its values); returns whether it did. Changes no value."""
        p = s.param
        if s.group is not None:
            return False
        if tuple(p.stride()) != s.stride or not owns_storage(p):
            return False
        with torch.no_grad():
            s.w.copy_(p)
            p.data = s.w
        s.adopted = True
        return True

    def is_adopted_view(self, s: Slot) -> bool:
        """Whether ``s``'s parameter still is its view of ``W``."""
        p = s.param
        return p.data_ptr() == s.ptr and p.shape == s.shape and p.stride() == s.stride

    @staticmethod
    def slot_free(view: torch.Tensor) -> bool:
        """Whether nobody but this bucket holds the storage of its ``view`` (a
        parameter that left it, or a held ``old = p.data``, would)."""
        return _users(view) == 1

    def fresh_param_buffer(self) -> None:
        """Give ``W`` new memory, because a tensor outside the bucket still views
        a slot whose parameter left it. Every adopted parameter that nothing
        else views moves to the new memory with its values; the others stay
        where they are and are packed from now on (copied in and out), so every
        tensor that views the old memory keeps seeing what torch.optim would
        show it: its parameter's updates, or the values it had when its
        parameter left it."""
        self.W = self._buffer(self.dtype)
        for s in self.slots:
            old, was_view = s.w, s.adopted and self.is_adopted_view(s)
            s.w = self._view(self.W, s)
            s.ptr = s.w.data_ptr() if s.numel else 0
            # the parameter and ``old`` hold the storage: nobody else does
            if was_view and _users(old) == 2:
                with torch.no_grad():
                    s.w.copy_(old)
                    s.param.data = s.w
            else:
                s.adopted = False

    def owns_memory(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage lies in one of this bucket's buffers."""
        if t.numel() == 0:
            return False
        ptr = t.untyped_storage().data_ptr()
        return any(buf.data_ptr() <= ptr < buf.data_ptr() + buf.numel() * buf.element_size()
                   for buf in (self.W, self.G, *self.S.values(),
                               *((self.M,) if self.M is not None else ())))

    # ------------------------------------------------------------ gradients
    def grad_buffer_free(self, slots: list[Slot]) -> bool:
        """Whether the gradient views of ``slots`` (no longer their
        parameters' ``.grad``) may be overwritten: nobody holds one of them,
        or a view of one."""
        if not self.grads_exposed:
            return True
        return all(sys.getrefcount(s.g) <= 2 and self.slot_free(s.g) for s in slots)

    def fresh_grad_buffer(self) -> None:
        """Give ``G`` new memory (the old views stay with whoever holds them),
        keeping the gradients that still are this bucket's views."""
        old = [(s, s.g) for s in self.slots]
        self.G = self._buffer(self.dtype)
        for s, g_old in old:
            s.g = self._view(self.G, s)
            p = s.param
            if p.grad is g_old:
                s.g.copy_(g_old)
                p.grad = s.g

    def state_entries(self, s: Slot, like, like_rows=None) -> dict[str, torch.Tensor]:
        """The tensors ``optimizer.state[p]`` holds for ``s``: views of the
        buffers (elem states laid out like the parameter through ``like``,
        row states like its dim 0 through ``like_rows``)."""
        out = {"step": s.states["step"]}
        for n, v in s.states.items():
            if n == "step":
                continue
            if n in self.S or n == "master":
                out[n] = like(v, s.param)
            elif n in self.R and like_rows is not None:
                out[n] = like_rows(v, s.param, s.rows)
            else:
                out[n] = v
        return out
