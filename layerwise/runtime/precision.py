"""How a step's float32 result reaches a bfloat16 or float16 parameter.

A step computes in float32 for 16-bit parameters (LANGUAGE.md section 8).
A LAMB step moves an element by about ``lr`` relative to its layer's
scale; bfloat16 keeps 8 significant bits (a relative spacing of 2^-8 to
2^-7), so rounding each result to the nearest bfloat16 loses most small
updates. ``lw.Optimizer(precision=...)`` chooses what happens instead
(:data:`PRECISIONS`):

``"master"``      a float32 master copy of each 16-bit parameter is an
                  element state (``state[p]["master"]``): every pass reads
                  it as ``w``, the final pass writes the new value into it
                  and, rounded to nearest, into the parameter
                  (:func:`write_master`). The update is exactly the float32
                  update; it costs 4 bytes per parameter element
                  (Micikevicius et al. 2018, "Mixed Precision Training",
                  arXiv:1710.03740, section 3.1).
``"stochastic"``  the float32 result is rounded stochastically into the
                  parameter (:func:`stochastic_round`): up with probability
                  equal to its distance from the lower neighbour over the
                  gap, so the expected parameter is the float32 result
                  (Gupta et al. 2015, "Deep Learning with Limited Numerical
                  Precision", arXiv:1502.02551, section 3). No memory cost.
``"nearest"``     round to nearest even (what a plain ``copy_`` does).

Stochastic rounding draws its random bits from a counter-based hash
(:func:`hash32`, an integer hash from Chris Wellons' hash prospector) of the
optimizer's seed, the parameter's position in the optimizer, its step
count ``t`` and each element's index within the parameter (for a parameter
sharded along dim 0, its index in the whole parameter): no generator state,
so a resumed run rounds as the uninterrupted one, the bits do not depend
on how parameters are bucketed or sharded, and the eager and compiled
paths (which run the same code) round identically. Everything is integer
arithmetic on int64 tensors with values below 2^32 (no overflow) and
bit casts, on any device.
"""
from __future__ import annotations

import numbers

import torch

__all__ = ["PRECISIONS", "HALF", "check_precision", "check_seed", "hash32", "seed_key",
           "segment_keys", "stochastic_round", "random_bits", "write_master",
           "write_stochastic", "rounded_pass"]

#: The values of ``precision=``: what a step does with a 16-bit parameter.
PRECISIONS = ("master", "stochastic", "nearest")

#: Parameter dtypes the choice applies to (float32 and float64 parameters
#: compute and store in their own dtype: no rounding, no master).
HALF = (torch.bfloat16, torch.float16)

_M32 = 0xFFFFFFFF


def check_precision(value, argument: str = "precision") -> str:
    """``value`` if it is one of :data:`PRECISIONS`.

    Raises:
        ValueError: naming ``argument`` and ``value`` otherwise (a wrong
            name or type).
    """
    if isinstance(value, str) and value in PRECISIONS:
        return value
    raise ValueError(f"{argument}={value!r} is not a precision for bfloat16 and float16 "
                     f"parameters: use \"master\" (a float32 master copy per parameter, the "
                     f"default), \"stochastic\" (stochastic rounding of each result) or "
                     f"\"nearest\" (round to nearest)")


def check_seed(value, argument: str = "rounding_seed") -> int:
    """``value`` as an int if it is a whole number in ``[0, 2**63)``.

    Raises:
        ValueError: naming ``argument`` and ``value`` otherwise.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) \
            and 0 <= int(value) < 2 ** 63:
        return int(value)
    raise ValueError(f"{argument}={value!r} is not a seed: give a whole number in [0, 2**63)")


_C1, _C2 = 0x21F0AAAD, 0x735A2D97     # both below 2^31: x * c < 2^63 fits int64


def hash32(x):
    """A bijective 32-bit integer hash (C. Wellons' "hash prospector", 2018-2022,
    the improved lowbias32: ``x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15;
    x *= 0x735a2d97; x ^= x >> 15``, arithmetic modulo 2^32).

    ``x``: an int64 tensor (any shape) or a Python int, with values in
    ``[0, 2^32)``; returns the same kind, values in ``[0, 2^32)``. Both
    multipliers are below 2^31, so each product of a 32-bit value is exact
    in int64 and one mask reduces it modulo 2^32: two integer operations per
    multiply, the same bits on every device and for ints and tensors.
    Works elementwise and compiles (integer ops only).
    """
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 15)


def seed_key(seed: int) -> int:
    """A 32-bit key of a seed in ``[0, 2**63)`` (both halves mixed)."""
    return hash32((seed & _M32) ^ hash32(seed >> 32))


def segment_keys(key: int, pids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per parameter, the 32-bit key of this step's random bits: a hash of the
    seed's ``key`` (:func:`seed_key`), its position ``pids`` in the optimizer
    (``(P,)`` int64) and its step count ``t`` (``(P,)``, any dtype holding
    whole numbers); ``(P,)`` int64 in ``[0, 2^32)``."""
    k = hash32(hash32(pids & _M32) ^ key)
    return hash32(k ^ (t.to(torch.int64) & _M32))


def random_bits(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """16 random bits per element: ``hash32(index ^ key) >> 16`` (the well mixed
    high half), int64 in ``[0, 2^16)``. ``index``: element indices (int64,
    ``< 2^32``); ``key``: per-parameter keys broadcast against it."""
    return hash32((index & _M32) ^ key) >> 16


def stochastic_round(x: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded stochastically to ``dtype`` (bfloat16 or float16).

    Args:
        x: float32 values (any shape).
        bits: integers in ``[0, 2^16)`` (int64 or int32), broadcast against
            ``x``: the random numbers, one per element (uniform for an
            unbiased rounding, e.g. :func:`random_bits`).
        dtype: ``torch.bfloat16`` or ``torch.float16``.

    Returns a tensor of ``dtype`` and ``x``'s shape. Each element is one of
    the two ``dtype`` values next to it (the lower with probability
    ``(hi - x) / (hi - lo)`` for uniform ``bits``: ``E[result] = x``
    exactly for values within range; Gupta et al. 2015, arXiv:1502.02551,
    eq. 5). Representable values, zeros, infinities and NaN are returned
    as they are; the sign is kept (rounding acts on the magnitude). Above
    the largest finite value the upper neighbour is infinity (float16:
    values of 65,536 and more always round to infinity, as to nearest).

    How: bfloat16 is the high half of float32, so adding 16 random bits to
    the magnitude's bit pattern and clearing the low 16 bits rounds up with
    the probability of the discarded fraction (carries reach the exponent
    as they should; subnormals are evenly spaced in both). float16 keeps 10
    of float32's 23 fraction bits: the same with 13 bits, exact wherever
    float16 is normal; below 2^-14 (float16's subnormals, spaced 2^-24),
    ``|x| + 2^-14`` is rounded instead (its float32 spacing is 2^-37, and
    its float16-like spacing 2^-24) and 2^-14 subtracted, exactly.

    Raises:
        ValueError: ``dtype`` is not bfloat16 or float16, or ``x`` is not float32.
    """
    if dtype not in HALF:
        raise ValueError(f"dtype={dtype} is not a 16-bit float type (bfloat16 or float16)")
    if x.dtype != torch.float32:
        raise ValueError(f"x has dtype {x.dtype}; stochastic rounding takes float32 values")
    nan = torch.isnan(x)
    a = torch.where(nan, 0.0, torch.abs(x))
    if dtype == torch.bfloat16:
        r = (bits.to(torch.int32) + a.view(torch.int32)) & -65536      # clear 16 low bits
        z = r.view(torch.float32)
    else:
        tiny = 2.0 ** -14
        small = a < tiny
        a = torch.where(small, a + tiny, a)
        r = ((bits >> 3).to(torch.int32) + a.view(torch.int32)) & -8192  # clear 13 low bits
        z = r.view(torch.float32)
        z = torch.where(small, z - tiny, z)
    return torch.where(nan, x, torch.copysign(z, x)).to(dtype)


def _flat_write(dst: torch.Tensor, value, active: torch.Tensor | None) -> torch.Tensor:
    # ``layerwise.runtime.flat_ops.write`` (imported late: flat_ops imports nothing of ours)
    from .flat_ops import write
    return write(dst, value, active)


def write_master(dst: torch.Tensor, value, active: torch.Tensor | None,
                 param: torch.Tensor) -> torch.Tensor:
    """The write of ``w`` under ``"master"``: ``value`` (float32) into the master
    buffer ``dst`` and, rounded to nearest, into the parameter buffer
    ``param`` (``(nchunks, C)``, bfloat16 or float16), on active chunks
    (``active``: ``(nchunks, 1)`` bool or None for all); returns ``dst``."""
    out = _flat_write(dst, value, active)
    _flat_write(param, value, active)
    return out


def write_stochastic(dst: torch.Tensor, value, active: torch.Tensor | None,
                     key: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The write of ``w`` under ``"stochastic"``: ``value`` (float32, broadcast to
    ``dst``'s ``(nchunks, C)``) rounded by :func:`stochastic_round` into the
    parameter buffer ``dst`` on active chunks. ``key``: ``(nchunks, 1)``
    int64, each chunk's parameter's key this step (:func:`segment_keys`);
    ``base``: ``(nchunks, 1)`` int64, the index within its parameter of each
    chunk's first element (the chunk's element ``j`` is ``base + j``)."""
    if not isinstance(value, torch.Tensor):
        value = torch.full_like(dst, value, dtype=torch.float32)
    value = torch.broadcast_to(value.to(torch.float32), dst.shape)
    index = base + torch.arange(dst.shape[1], device=dst.device, dtype=torch.int64)
    return _flat_write(dst, stochastic_round(value, random_bits(index, key), dst.dtype), active)


def rounded_pass(flat, mode: str):
    """``flat`` (a ``layerwise.runtime.flatten.FlatPass`` that writes ``w``) with
    its write of ``w`` made by :func:`write_master` or :func:`write_stochastic`
    (``mode`` ``"master"`` or ``"stochastic"``; ``"nearest"``: ``flat`` as it
    is). The elem graph gets new inputs after its ``act`` input, named in the
    result's ``extra``: ``("param",)`` (the parameter buffer, while ``w`` is
    the master buffer) or ``("round_key", "round_base")``."""
    import dataclasses

    import torch.fx as fx

    from . import flat_ops
    if mode == "nearest" or "w" not in flat.dsts:
        return flat
    graph = fx.Graph()
    env: dict = {}
    nodes = list(flat.elem.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for n in placeholders:
        env[n] = graph.node_copy(n, lambda a: env[a])
    taken = {n.name for n in placeholders}
    names = ("param",) if mode == "master" else ("round_key", "round_base")
    extra = []
    for name in names:
        unique, k = name, 0
        while unique in taken:
            k += 1
            unique = f"{name}_{k}"
        extra.append(graph.placeholder(unique))
    dst_w = placeholders[len(flat.elem_inputs) + flat.dsts.index("w")]
    for n in nodes:
        if n.op == "placeholder":
            continue
        if n.op == "call_function" and n.target is flat_ops.write and n.args[0] is dst_w:
            args = tuple(env[a] if isinstance(a, fx.Node) else a for a in n.args)
            fn = write_master if mode == "master" else write_stochastic
            env[n] = graph.call_function(fn, (*args, *extra))
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.lint()
    elem = fx.GraphModule(torch.nn.Module(), graph,
                          class_name=f"{flat.elem.__class__.__name__}_{mode}")
    return dataclasses.replace(flat, elem=elem, extra=names)
