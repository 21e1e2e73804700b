"""Three runtime designs for a multi-tensor LAMB step, compiled with torch.compile.

Usage::

    python benchmarks/runtime_designs.py --sets small4 --repeats 2          # quick check
    python benchmarks/runtime_designs.py --out benchmarks/RUNTIME-DESIGNS.md  # everything

The update is LAMB (You et al. 2019, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", arXiv:1904.00962, Algorithm 2), per
parameter tensor w with gradient g at step t::

    m = b1*m + (1-b1)*g;   v = b2*v + (1-b2)*g^2
    r = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps);   u = r + wd*w
    w = w - lr * trust * u,  trust = ||w|| / ||u|| if both norms > 0 else 1

Designs (see /work/shared/RUNTIME-NOTES.md):

1. whole-list graph: a Python loop over the lists of all tensors, compiled
   once (fullgraph, dynamic=False); 1 call/step.
2. fixed-size buckets: the same loop over exactly K flat tensors, dynamic=True
   (duck shaping off), ceil(N/K) calls/step, last bucket padded with dummies.
3. segmented flat layout: tensors packed once into (nchunks, C=256) buffers,
   each padded to a multiple of C (``seg``: chunk -> tensor, ``valid``: real
   elements per chunk). Pass 1 writes m, v and returns per-chunk sums of w^2
   and u^2 (summed per tensor by ``torch.segment_reduce`` in float64); pass 2
   writes w; per-tensor scalars enter as ``x[seg].unsqueeze(1)``. 2 calls/step.

Each (design, set) runs in a fresh subprocess with an empty inductor cache;
AdamW (fused, foreach) is timed in it as an anchor. Design 1 is not compiled on
the large sets (~2 s per tensor): its time is extrapolated from N = 4, 16, 64.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

B1, B2, EPS, WD, LR = 0.9, 0.999, 1e-6, 0.01, 1e-3
CHUNK = 256
SMALL = ("small4", "small16", "small64")
LARGE = ("1000x256", "bert")
DESIGNS = {1: "whole-list graph", 2: "fixed-size buckets", 3: "segmented flat layout"}
SKIP_LIMIT_S = 120.0


def bert_shapes(hidden=768, layers=12, vocab=30522, max_pos=512):
    """The 199 parameter shapes of BERT-base with a pooler."""
    shapes = [(vocab, hidden), (max_pos, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4 + [(hidden,)] * 2
        shapes += [(4 * hidden, hidden), (4 * hidden,), (hidden, 4 * hidden), (hidden,)]
        shapes += [(hidden,)] * 2
    return shapes + [(hidden, hidden), (hidden,)]


SETS = {
    "small4": ("4 small 1-D tensors (4 x 4096)", [(4096,)] * 4),
    "small16": ("16 small 1-D tensors (16 x 4096)", [(4096,)] * 16),
    "small64": ("64 small 1-D tensors (64 x 4096)", [(4096,)] * 64),
    "1000x256": ("1000 x 256", [(256,)] * 1000),
    "bert": ("BERT-base (199 tensors)", bert_shapes()),
}


def make_tensors(shapes, seed=0):
    """[(w0, g)]: weights randn*0.02, gradients randn*1e-3, float32, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 0.02, torch.randn(s, generator=gen) * 1e-3)
            for s in shapes]


def lamb_u(w, m, v, c1, c2, eps, wd):
    """u = m_hat / (sqrt(v_hat) + eps) + wd*w, with c1 = 1/(1-b1^t), c2 = 1/(1-b2^t)."""
    return (m * c1) / ((v * c2).sqrt() + eps) + wd * w


def lamb_lists(ws, gs, ms, vs, c1, c2):
    """Designs 1 and 2: in-place LAMB over lists; c1, c2 are 0-d tensors."""
    for w, g, m, v in zip(ws, gs, ms, vs):
        m.mul_(B1).add_(g, alpha=1 - B1)
        v.mul_(B2).addcmul_(g, g, value=1 - B2)
        u = lamb_u(w, m, v, c1, c2, EPS, WD)
        wn, un = torch.linalg.vector_norm(w), torch.linalg.vector_norm(u)
        trust = torch.where((wn > 0) & (un > 0), wn / un, torch.ones_like(wn))
        w.sub_(LR * trust * u)


class ListRunner:
    """Design 1 (k=None: one call over all tensors) or design 2 (buckets of k)."""

    def __init__(self, init, k=None):
        # fresh 1-D tensors, not views (a view input makes dynamo guard on its base)
        self.w = [w0.reshape(-1).clone() for w0, _ in init]
        self.g = [g.reshape(-1).clone() for _, g in init]
        self.m = [torch.zeros_like(w) for w in self.w]
        self.v = [torch.zeros_like(w) for w in self.w]
        n, k = len(self.w), k or len(self.w)
        pad = -n % k  # dummies, distinct sizes >= 2 so no 0/1 specialisation
        lists = [self.w + [torch.zeros(2 + i) for i in range(pad)]]
        lists += [x + [torch.zeros(2 + i) for i in range(pad)] for x in (self.g, self.m, self.v)]
        self.buckets = [tuple(x[i:i + k] for x in lists) for i in range(0, n + pad, k)]
        self.fn = torch.compile(lamb_lists, fullgraph=True, dynamic=k != n)
        self.t = 0

    def step(self):
        self.t += 1
        c1, c2 = torch.tensor(1 / (1 - B1 ** self.t)), torch.tensor(1 / (1 - B2 ** self.t))
        for bucket in self.buckets:
            self.fn(*bucket, c1, c2)

    def weights(self):
        return self.w


def seg_pass1(W, G, M, V, seg, valid, b1, b2, eps, wd, c1, c2):
    """Write M, V; return per-chunk sums of w^2 and u^2 (padding masked out).

    u is computed from the written buffers M, V, not from the temporaries (in
    torch 2.13 both spellings give byte-identical code: one C++ kernel whose
    loop over chunks holds both row reductions and the stores of M, V)."""
    col = lambda x: x[seg].unsqueeze(1)  # noqa: E731  (P,) -> (nchunks, 1)
    b1c, b2c = col(b1), col(b2)
    M.copy_(b1c * M + (1 - b1c) * G)
    V.copy_(b2c * V + (1 - b2c) * G * G)
    u = lamb_u(W, M, V, col(c1), col(c2), col(eps), col(wd))
    mask = torch.arange(W.shape[1], device=W.device) < valid.unsqueeze(1)
    return torch.where(mask, W * W, 0.0).sum(1), torch.where(mask, u * u, 0.0).sum(1)


def seg_pass2(W, M, V, seg, eps, wd, c1, c2, scale):
    """W -= (lr*trust)[seg] * u."""
    col = lambda x: x[seg].unsqueeze(1)  # noqa: E731
    W.sub_(col(scale) * lamb_u(W, M, V, col(c1), col(c2), col(eps), col(wd)))


def dyn(*xs):
    for x in xs:
        torch._dynamo.mark_dynamic(x, 0)


class SegmentedRunner:
    """Design 3: parameters live in (nchunks, CHUNK) buffers, packed once."""

    def __init__(self, init):
        self.sizes = torch.tensor([w.numel() for w, _ in init])
        chunks = (self.sizes + CHUNK - 1) // CHUNK
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), chunks.cumsum(0)])
        nch, P = int(self.offsets[-1]), len(init)
        self.W, self.G, self.M, self.V = (torch.zeros(nch, CHUNK) for _ in range(4))
        for i, (w0, g) in enumerate(init):
            s, n = int(self.offsets[i]) * CHUNK, w0.numel()
            self.W.view(-1)[s:s + n] = w0.reshape(-1)
            self.G.view(-1)[s:s + n] = g.reshape(-1)
        self.seg = torch.repeat_interleave(torch.arange(P), chunks)
        pos = torch.arange(nch) - self.offsets[:-1][self.seg]
        self.valid = (self.sizes[self.seg] - pos * CHUNK).clamp(max=CHUNK)
        hyper = lambda x: torch.full((P,), x, dtype=torch.float64)  # noqa: E731
        self.b1, self.b2, self.lr = hyper(B1), hyper(B2), hyper(LR)
        self.k_b1, self.k_b2, self.k_eps, self.k_wd = (
            hyper(x).float() for x in (B1, B2, EPS, WD))
        self.t = torch.zeros(P, dtype=torch.float64)
        dyn(self.W, self.G, self.M, self.V, self.seg, self.valid,
            self.k_b1, self.k_b2, self.k_eps, self.k_wd)
        self.p1 = torch.compile(seg_pass1, fullgraph=True, dynamic=False)
        self.p2 = torch.compile(seg_pass2, fullgraph=True, dynamic=False)

    def step(self):
        self.t += 1
        c1 = (1 / (1 - self.b1 ** self.t)).float()
        c2 = (1 / (1 - self.b2 ** self.t)).float()
        dyn(c1, c2)
        wsq, usq = self.p1(self.W, self.G, self.M, self.V, self.seg, self.valid,
                           self.k_b1, self.k_b2, self.k_eps, self.k_wd, c1, c2)
        wn = torch.segment_reduce(wsq.double(), "sum", offsets=self.offsets).sqrt()
        un = torch.segment_reduce(usq.double(), "sum", offsets=self.offsets).sqrt()
        trust = torch.where((wn > 0) & (un > 0), wn / un, 1.0)
        scale = (self.lr * trust).float()
        dyn(scale)
        self.p2(self.W, self.M, self.V, self.seg, self.k_eps, self.k_wd, c1, c2, scale)

    def weights(self):
        flat = self.W.view(-1)
        return [flat[int(o) * CHUNK:int(o) * CHUNK + int(n)]
                for o, n in zip(self.offsets[:-1], self.sizes)]


def reference(w0, g, steps=2):
    """Plain eager float64 LAMB on one tensor."""
    w, g = w0.double().reshape(-1), g.double().reshape(-1)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t in range(1, steps + 1):
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        u = lamb_u(w, m, v, 1 / (1 - B1 ** t), 1 / (1 - B2 ** t), EPS, WD)
        wn, un = w.norm(), u.norm()
        trust = wn / un if wn > 0 and un > 0 else 1.0
        w = w - LR * trust * u
    return w


def max_rel_err(weights, init):
    errs = []
    for w, (w0, g) in zip(weights, init):
        ref = reference(w0, g)
        errs.append(float((w.double() - ref).abs().max() / ref.abs().max()))
    return max(errs)


def time_steps(step, warmup, repeats):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def adamw_ms(init, fused, warmup, repeats):
    params = [torch.nn.Parameter(w0.clone()) for w0, _ in init]
    for p, (_, g) in zip(params, init):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=fused, foreach=not fused)
    return time_steps(opt.step, warmup, repeats)


def worker(design, set_name, args):
    """One (design, set) measurement; runs in a fresh subprocess."""
    import torch.fx.experimental._config  # noqa: F401
    from torch._dynamo.utils import counters
    torch.fx.experimental._config.use_duck_shape = False
    torch._dynamo.config.recompile_limit = 1000
    init = make_tensors(SETS[set_name][1])
    runner = (SegmentedRunner(init) if design == 3 else
              ListRunner(init, args.bucket_size if design == 2 else None))
    t0 = time.perf_counter()
    runner.step()
    cold = time.perf_counter() - t0
    graphs_first = counters["stats"]["unique_graphs"]
    runner.step()
    err = max_rel_err(runner.weights(), init)
    med, mn = time_steps(runner.step, args.warmup, args.repeats)
    calls = len(runner.buckets) if design != 3 else 2
    res = dict(cold=cold, calls=calls, graphs_first=graphs_first,
               graphs=counters["stats"]["unique_graphs"], med=med, min=mn, err=err)
    del runner
    res["fused"] = adamw_ms(init, True, args.warmup, args.repeats)[0]
    res["foreach"] = adamw_ms(init, False, args.warmup, args.repeats)[0]
    return res


def spawn(design, set_name, args):
    cache = tempfile.mkdtemp(prefix="inductor-cold-")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{design}:{set_name}",
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--bucket-size", str(args.bucket_size)]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    print(f"[design {design} on {set_name}] ...", file=sys.stderr, flush=True)
    try:
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True,
                             timeout=args.timeout, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
        return {"failed": type(e).__name__}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma list of {', '.join(SETS)}")
    ap.add_argument("--designs", default="1,2,3", help="comma list of 1, 2, 3")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bucket-size", type=int, default=8, help="K for design 2")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    ap.add_argument("--out", help="write the markdown report here (default: print only)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        d, s = args.worker.split(":")
        print(json.dumps(worker(int(d), s, args)))
        return
    sets = [s for s in SETS if s in args.sets.split(",")]
    designs = [int(d) for d in args.designs.split(",")]
    res = {}
    if 1 in designs and any(s in LARGE for s in sets):  # points for the design-1 fit
        for s in SMALL:
            res[1, s] = spawn(1, s, args)
    for s in sets:
        for d in designs:
            if (d, s) in res or (d == 1 and s in LARGE):
                continue
            slow = [(k[1], r["cold"] / r["graphs_first"]) for k, r in res.items()
                    if k[0] == 2 and r.get("cold", 0) / r.get("graphs_first", 1) > SKIP_LIMIT_S]
            res[d, s] = spawn(d, s, args) if not (d == 2 and s in LARGE and slow) else {
                "skipped": f"not run: one design-2 compile took {slow[0][1]:.0f} s on "
                f"{slow[0][0]} (> {SKIP_LIMIT_S:.0f} s); it depends on K, not N: expect about "
                "that per graph compiled (extrapolation)"}
    lines = ["# Runtime designs for a multi-tensor LAMB step", "",
             f"Made by: `python {' '.join(sys.argv)}`", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads ({os.cpu_count()} "
             f"CPUs), float32; lr={LR}, b1={B1}, b2={B2}, eps={EPS}, wd={WD}; K={args.bucket_size}"
             f", C={CHUNK}; {args.warmup} warm-up + {args.repeats} timed steps. Cold compile = "
             "first step in a fresh process with an empty inductor cache. Error = max over "
             "tensors of max|w - w_ref| / max|w_ref| after 2 steps vs eager float64 (< 1e-5). "
             "AdamW is timed in the process of that row. Graphs = graphs compiled after step 1 "
             "/ at the end (inductor's C++ reductions guard `numel >= 4097` per tensor, so a "
             "design-2 bucket compiles once per small/large pattern).", ""]
    fit = None
    if all((1, s) in res and "cold" in res[1, s] for s in SMALL):
        pts = [(len(SETS[s][1]), res[1, s]["cold"]) for s in SMALL]
        slope, icpt = statistics.linear_regression(*zip(*pts))  # least squares t = a + b*N
        fit = icpt, slope
        lines += ["Design 1 compile-time fit over N = 4, 16, 64 ("
                  + ", ".join(f"{t:.1f} s" for _, t in pts)
                  + f"): {fit[0]:.1f} s + {fit[1]:.2f} s per tensor.", ""]
    for s in sets:
        label, shapes = SETS[s]
        numel = sum(math.prod(x) for x in shapes)
        lines += [f"## {label}: {len(shapes)} tensors, {numel / 1e6:.2f}M parameters", "",
                  "| design | cold compile s | calls/step | graphs (after step 1 / end) "
                  "| median ms | min ms | max rel err | AdamW fused ms | AdamW foreach ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for d in designs:
            r, name = res.get((d, s), {}), f"{d}. {DESIGNS[d]}"
            if d == 1 and s in LARGE:
                est = (f"~{fit[0] + fit[1] * len(shapes):.0f} (extrapolated from the N = 4, 16, 64 "
                       "fit, not run)") if fit else "not run (no N = 4, 16, 64 points)"
                lines.append(f"| {name} | {est} | 1 | - | - | - | - | - | - |")
            elif "cold" in r:
                lines.append(
                    f"| {name} | {r['cold']:.1f} | {r['calls']} | {r['graphs_first']} / "
                    f"{r['graphs']} | {r['med']:.3f} | {r['min']:.3f} | {r['err']:.1e}"
                    f"{'' if r['err'] < 1e-5 else ' FAIL'} | {r['fused']:.3f} | {r['foreach']:.3f} |")
            else:
                why = r.get("skipped") or f"failed: {r.get('failed')}"
                lines.append(f"| {name} | {why} | - | - | - | - | - | - | - |")
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
