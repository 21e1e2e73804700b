"""The runtime: running a lowered program over every parameter at once.

``layout``     the segmented flat layout (buffers, slots, views) of a bucket
``buckets``    which parameters are in which bucket, kept in sync every step
``flatten``    a per-parameter pass graph -> vec and elem graphs over buckets
``procedure``  a lowered program -> its init, reduce and update procedures
``execute``    one flat pass, compiled (one call) or eager (in blocks)
``runner``     a procedure over all buckets, level by level
``distributed`` FSDP2 shards: partials combined with one collective per level
``validate``   the checks that make a step and a state load atomic
``precision``  16-bit parameters: master copies, stochastic rounding
"""
from .layout import CHUNK, compute_dtype
from .runner import Runner, runner_for

__all__ = ["CHUNK", "compute_dtype", "Runner", "runner_for"]
