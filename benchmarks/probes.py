"""Measurements that need a fresh process: compile time and the memory a step adds.

Each probe runs a short script in a new Python process (``subprocess``) and
reads one JSON line from it:

* :func:`compile_time`: the first compiled ``lamb`` step on a parameter set
  with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` set to a new
  folder): the time dynamo reports for compiling (its
  ``_compile.compile_inner``: tracing, inductor, the C++ build), and the
  whole first step, which also lays the parameters out and creates the
  state (work that grows with the model, unlike the compile).
* :func:`step_memory`: on the CPU, the resident set a compiled ``lamb`` step
  adds, read from ``/proc/self/status`` (``VmHWM``, restarted before each
  measured step through ``/proc/self/clear_refs``; ``getrusage``'s
  ``ru_maxrss`` survives ``exec`` and would report the parent's peak); on
  CUDA, the caching allocator's peak (``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["compile_time", "step_memory"]

_HERE = str(Path(__file__).parent)

_COMPILE = """
import sys, time, json, torch
from torch._dynamo.utils import compilation_time_metrics
sys.path.insert(0, {here!r})
from step_time import make_params, set_shapes
import layerwise as lw
params = make_params(set_shapes({name!r}), {device!r})
opt = lw.Optimizer(params, "lamb", compile=True)
def step():
    t0 = time.perf_counter(); opt.step()
    if {device!r}.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0
first = step()
compile = sum(compilation_time_metrics.get("_compile.compile_inner", []))
step(); steady = min(step() for _ in range(3))
print(json.dumps({{"first": first, "steady": steady, "compile": compile}}))
"""

_MEMORY = """
import sys, json, torch
sys.path.insert(0, {here!r})
from step_time import make_params, set_shapes
import layerwise as lw
cuda = {device!r}.startswith("cuda")

def mib(field):
    if cuda:
        return (torch.cuda.max_memory_allocated() if field == "VmHWM"
                else torch.cuda.memory_allocated()) / 2**20
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) / 1024

def peak_of(fn):
    if cuda:
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    else:
        open("/proc/self/clear_refs", "w").write("5")     # restart VmHWM at the current RSS
    fn()
    if cuda:
        torch.cuda.synchronize()
    return mib("VmHWM")

# compile the graphs on a tiny set first, so that compiled code is not counted
warm = make_params([(300,), (7,)], {device!r})
opt = lw.Optimizer(warm, "lamb", compile=True)
opt.step(); opt.step()
params = make_params(set_shapes({name!r}), {device!r})
before = mib("VmRSS")
opt = lw.Optimizer(params, "lamb", compile=True)
first = peak_of(opt.step) - before
live = None
if not cuda:
    # memory freed by the step (the adopted parameters' and copied gradients' old
    # storage) that glibc keeps for reuse instead of returning it: give it back
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    live = mib("VmRSS") - before
opt.step()
rss = mib("VmRSS")
steady = peak_of(opt.step) - rss
fresh_grads = [torch.randn_like(p) for p in params]
for p, g in zip(params, fresh_grads):
    p.grad = g
del fresh_grads
rss_fresh = mib("VmRSS")
fresh = peak_of(opt.step) - rss_fresh
after_fresh = mib("VmRSS") - rss
state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
largest = max(p.numel() * p.element_size() for p in params)
grads = sum(p.numel() * p.element_size() for p in params)
print(json.dumps({{"first": first, "live": live, "steady": steady, "fresh": fresh,
                  "after_fresh": after_fresh,
                  "state": state / 2**20, "largest": largest / 2**20,
                  "grads": grads / 2**20}}))
"""


def _run(code: str, env=None) -> dict:
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"probe failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compile_time(name: str, device: str = "cpu") -> dict:
    """``{"compile": s, "first": s, "steady": s}`` of a compiled ``lamb`` step
    on set ``name``, with an empty inductor cache: the compile time dynamo
    reports, the first step's wall time, a later step's."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        return _run(_COMPILE.format(here=_HERE, name=name, device=device), env)


def step_memory(name: str, device: str = "cpu") -> dict:
    """MiB a compiled ``lamb`` step on set ``name`` adds: ``first`` (the peak of
    the first step: state and layout), ``live`` (CPU: what stays after it once
    the C allocator has returned the memory the step freed, ``malloc_trim``),
    ``steady`` (a later step, gradients in place),
    ``fresh`` (a step with new gradient tensors, which are copied in),
    ``after_fresh`` (what stays after it); with ``state``, ``largest`` (the
    largest parameter) and ``grads`` (all gradients) for scale."""
    return _run(_MEMORY.format(here=_HERE, name=name, device=device))
