"""Run a program's procedures over buckets of parameters: the step of the runtime.

:class:`Runner` holds the flat passes of one lowered program
(``layerwise.runtime.procedure``) as callables, eager or compiled
(``layerwise.runtime.execute``), and runs a procedure over every bucket
(``layerwise.runtime.layout``) level by level: each level pass returns
per-chunk partials, which are added up per parameter with
``torch.segment_reduce`` in float64 (deterministic, a fixed order) and, for
sharded parameters, combined across ranks with one collective per level
for all buckets (``layerwise.runtime.distributed``). The final pass writes
the buffers and returns per-parameter outputs.

Per step and bucket this is a constant number of calls (one per pass, plus
a few small ops on ``(P,)`` vectors), whatever the number of parameters;
nothing waits on the host: step counts, hyperparameters and partials stay
on the parameters' device.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from ..check import CheckedProgram
from ..lower import Lowered, finish_globals, lower
from .distributed import Combiner
from . import flat_ops
from .execute import eager_block, pass_function
from .layout import CHUNK, Bucket
from .precision import rounded_pass
from .procedure import Pass, Procedure, procedures

__all__ = ["Runner", "runner_for", "any_nonfinite"]


def any_nonfinite(buckets: Sequence[Bucket], shards: Sequence[dict] = ()) -> torch.Tensor:
    """Whether any active segment's gradient holds a NaN or an infinity: a
    0-d bool tensor on the first bucket's device, decided on the device
    (no host synchronisation; with buckets on several devices their flags
    are moved to the first bucket's device).

    Reads each bucket's gradient buffer ``G`` (``(nchunks, C)``, any float
    dtype) once: the sum of every chunk (in float32 for 16-bit gradients)
    must be finite, for the chunks of active segments (an inactive segment
    may hold a stale or uninitialised gradient; padding is zero). A NaN or
    an infinity always makes its chunk's sum non-finite (inf + -inf is
    NaN); so does a chunk of finite values whose sum overflows (values
    above about ``finfo.max / C``: 3e35 in float32 and bfloat16 with
    ``C = 1024``, 1e305 in float64, never in float16), which counts as
    non-finite too. ``shards``: per bucket, the
    process groups of its sharded segments (``Bucket.shards()``); the flag
    is then combined over each group with one ``all_reduce`` (MAX), so that
    every rank decides the same.
    """
    device = buckets[0].device
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for b in buckets:
        if not any(b.active_key) or b.G.numel() == 0:
            continue
        # one vectorised sum per chunk (half the time of amax and amin on the CPU);
        # float32 sums for 16-bit gradients, which would overflow float16
        G = b.G
        finite = torch.isfinite(G.sum(1, dtype=torch.float32) if G.element_size() < 4
                                else G.sum(1))
        if not all(b.active_key):
            finite = finite | ~b.active_chunks.squeeze(1)
        bad = bad | (~finite.all()).to(device)
    groups = list(dict.fromkeys(g for per_bucket in shards for g in per_bucket))
    if groups:
        import torch.distributed as dist
        flag = bad.to(torch.int32)
        for group in groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        bad = flag.bool()
    return bad


class Runner:
    """The passes of one lowered program, eager (``compile=False``) or compiled.

    ``chunk``: the chunk length C its graphs are made for (buckets must use
    the same). An *environment* maps the names of a procedure's per-parameter
    inputs to ``(P,)`` vectors (or 0-d globals) of one bucket: ``t`` (this
    step's step count), ``numel``, each hyper, each layer state, each global.
    """

    def __init__(self, lowered: Lowered, compile: bool, chunk: int = CHUNK):
        self.lowered = lowered
        self.compiled = compile
        self.chunk = chunk
        self.procs = procedures(lowered, chunk)
        # placeholder name -> the hyper or state it stands for (environments and
        # buffers are keyed by program names; see Lowered.placeholders)
        self._named = {ph: n for n, ph in lowered.placeholders.items() if ph != n}
        self._fns: dict[tuple[int, str], object] = {}
        # per pass: its procedure's name and index (for its function's name)
        self._where = {id(p): (pname, k) for pname, proc in self.procs.items()
                       for k, p in enumerate([*proc.levels, proc.final])}
        self._eager = {id(p): not compile or pname == "init"
                       for pname, proc in self.procs.items() for p in [*proc.levels, proc.final]}
        for pname, proc in self.procs.items():
            for p in [*proc.levels, proc.final]:
                self._fn(p, "nearest")

    def _fn(self, p: Pass, mode: str):
        """The function running pass ``p`` for buckets of precision ``mode``
        (``layerwise.runtime.precision``; made on first use: a pass that does
        not write ``w`` has one function for every mode)."""
        if "w" not in p.flat.dsts:
            mode = "nearest"
        fn = self._fns.get((id(p), mode))
        if fn is None:
            pname, k = self._where[id(p)]
            suffix = "" if mode == "nearest" else f"_{mode}"
            # init runs once per parameter: always eager, never compiled
            fn = self._fns[(id(p), mode)] = pass_function(
                rounded_pass(p.flat, mode), self.compiled and pname != "init",
                f"{self.lowered.program.name}_{pname}_{k}{suffix}", self.lowered.units)
        return fn

    def _call(self, p: Pass, bucket: Bucket, env: dict, reds: list, active: torch.Tensor,
              act: torch.Tensor | None = None):
        f = p.flat
        mode = bucket.precision
        # under "master" every pass reads and writes w in the float32 master buffer
        buffers = {"w": bucket.M if mode == "master" else bucket.W, "g": bucket.G, **bucket.X,
                   **bucket.S, **bucket.row_views}
        # partials of reductions along rows are per-chunk inputs of the elem graph
        named = self._named
        elem_in = [reds[p.reads[n]].unsqueeze(1) if n in p.reads else buffers[named.get(n, n)]
                   for n in f.elem_inputs]
        vec = [reds[p.reads[n]] if n in p.reads else env[k] if (k := named.get(n, n)) in env
               else bucket.colref for n in f.vec_inputs]
        # ``act``, the per-chunk mask, may come with ``active`` (the non-finite guard's)
        if act is None and active is bucket.active:
            # eager: None when every segment is active (writes become plain copies)
            act = None if self._eager[id(p)] and all(bucket.active_key) \
                else bucket.active_chunks
        elif act is None:
            act = active[bucket.seg].unsqueeze(1)
        eager_cpu = self._eager[id(p)] and bucket.device.type == "cpu"
        valid = bucket.partial_rows(eager_block(self.chunk)) if eager_cpu else bucket.valid
        fn = self._fn(p, mode)
        extra = () if mode == "nearest" or "w" not in f.dsts else \
            (bucket.W,) if mode == "master" else (bucket.round_key, bucket.round_base)
        return fn(elem_in, [buffers[n] for n in f.dsts], vec,
                  [bucket.L[n] if n in bucket.L else bucket.CS[n] for n in f.vec_writes],
                  bucket.seg, valid, active, act, extra)

    def run(self, name: str, buckets: Sequence[Bucket], envs: Sequence[dict],
            actives: Sequence[torch.Tensor], combine: Combiner | None,
            acts: Sequence[torch.Tensor] | None = None) -> list[list]:
        """Run procedure ``name`` over ``buckets`` (segments where ``actives``
        is True are written); returns, per bucket, the final pass's
        per-parameter outputs (``(P,)`` vectors, 0-d tensors or floats).

        ``actives``: per bucket a ``(P,)`` bool mask on its device; ``acts``
        (optional): the same masks per chunk, ``(nchunks, 1)`` bool (made from
        ``actives`` when not given)."""
        proc: Procedure = self.procs[name]
        reds = [[None] * proc.reductions for _ in buckets]
        acts = [None] * len(buckets) if acts is None else acts
        for lv in proc.levels:
            per_bucket = [self._reduce(b, self._call(lv, b, env, r, a, c)[0], lv.flat.partials,
                                       lv.spaces)
                          for b, env, r, a, c in zip(buckets, envs, reds, actives, acts)]
            if combine is not None:
                combine(per_bucket, list(lv.flat.partials), list(lv.spaces))
            for b, r, values in zip(buckets, reds, per_bucket):
                for i, v in zip(lv.computes, values):
                    r[i] = v.to(b.cdtype)
        # a final pass returns no partials: every reduction is a level's
        return [self._call(proc.final, b, env, r, a, c)[1]
                for b, env, r, a, c in zip(buckets, envs, reds, actives, acts)]

    @staticmethod
    def _reduce(b: Bucket, chunk_partials, how, spaces) -> list[torch.Tensor]:
        """Each parameter's total of its chunks' partials: ``(P,)`` float64;
        for a reduction along rows each chunk's (a row's) partial as it is,
        ``(nchunks,)``; along columns each parameter's column totals, ``(P, C)``."""
        out = []
        for x, kind, space in zip(chunk_partials, how, spaces or ("seg",) * len(how)):
            if space == "row":
                out.append(x.to(torch.float64))
            elif space == "col":
                out.append(flat_ops.segment_columns(x, b.seg, b.offsets, len(b.offsets) - 1,
                                                    "sum" if kind == "sum" else "max"))
            else:
                out.append(torch.segment_reduce(x.to(torch.float64),
                                                "sum" if kind == "sum" else "max",
                                                offsets=b.offsets, initial=0.0))
        return out

    def globals(self, buckets: Sequence[Bucket], envs: Sequence[dict],
                actives: Sequence[torch.Tensor], combine: Combiner | None,
                acts: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """This step's global values (0-d float64, on the first bucket's device):
        every parameter's shares of each ``global_norm`` / ``global_sum``,
        added over the active parameters, finished (``sqrt`` for norms)."""
        out = self.run("reduce", buckets, envs, actives, combine, acts)
        device = buckets[0].device
        totals = []
        for i in range(len(self.lowered.globals)):
            total = torch.zeros((), dtype=torch.float64, device=device)
            for b, shares, a in zip(buckets, out, actives):
                # shares are whole-parameter values (sharded partials were
                # combined by the level passes), the same on every rank
                share = torch.as_tensor(shares[i], dtype=torch.float64, device=b.device)
                total = total + torch.where(a, share, 0).sum().to(device)
            totals.append(total)
        return finish_globals(self.lowered, totals)


_CACHE: dict[tuple[CheckedProgram, bool], Runner] = {}


def runner_for(program: CheckedProgram, compile: bool) -> Runner:
    """The (cached) runner of ``program``: compiled once per program, not per
    optimizer. Programs that differ only in their ``for`` rules and name
    (``lamb_per_head`` and ``lamb_rowwise``) have the same graphs and share one."""
    key = (replace(program, rules=(), name=""), compile)
    runner = _CACHE.get(key)
    if runner is None:
        runner = _CACHE[key] = Runner(lower(program), compile)
    return runner
