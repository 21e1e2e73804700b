"""The markdown report of ``benchmarks/step_time.py`` (RESULTS.md): tables and targets."""
from __future__ import annotations

import torch

__all__ = ["markdown"]

TITLES = {"small": "BERT-small (hidden 512, 4 layers)", "base": "BERT-base (hidden 768, 12 layers)",
          "large": "BERT-large (hidden 1024, 24 layers)", "many": "1,000 tensors of 256 values"}
LAMB, EAGER = "layerwise lamb (compiled)", "layerwise lamb (eager)"


def _table(r: dict) -> list[str]:
    lines = [f"## {TITLES.get(r['set'], r['set'])}: {r['tensors']} tensors, "
             f"{r['numel'] / 1e6:.2f}M values", "",
             f"Floor (one call of a streaming kernel moving 28 B/value over flat arrays): "
             f"**{r['floor_s'] * 1e3:.2f} ms** ({r['bandwidth_GBps']:.1f} GB/s); LAMB's "
             f"two-pass bound (40 B/value) = {40 / 28 * r['floor_s'] * 1e3:.2f} ms.", "",
             "Ratios are paired: per repeat, this method's step over the step of the "
             "AdamW it was interleaved with (its group's), then the median (and the "
             "range) over the repeats.", "",
             "| method | median ms | min ms | / its AdamW: median (min-max) | / floor: median |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for label, m in r["methods"].items():
        a = m["vs_anchor"]
        vs = "anchor" if m["anchor"] == label else \
            f"{a['median']:.2f} ({a['min']:.2f}-{a['max']:.2f})"
        floor = f"{m['vs_floor']['median']:.2f}" if "vs_floor" in m else "-"
        lines.append(f"| {label} | {m['median_s'] * 1e3:.2f} | {m['min_s'] * 1e3:.2f} | {vs} | "
                     f"{floor} |")
    return lines + [""]


def _targets(results: list[dict], probes: dict) -> list[str]:
    """Issue 11's targets, each with what this run measured (paired ratios)."""
    by = {r["set"]: r for r in results}
    out = ["## Targets (issue 11)", "",
           "| target | measured: paired ratio, median (min-max over repeats) | met |",
           "| --- | --- | --- |"]

    def row(text, ratio, limit):
        if ratio is not None:
            out.append(f"| {text} | {ratio['median']:.2f} x ({ratio['min']:.2f}-"
                       f"{ratio['max']:.2f}) | {'yes' if ratio['median'] <= limit else '**no**'} |")

    def get(r, label, key="vs_anchor"):
        return r["methods"].get(label, {}).get(key) if r else None

    base, many = by.get("base"), by.get("many")
    row("BERT-base: compiled lamb <= 1.5 x AdamW(fused=True)", get(base, LAMB), 1.5)
    row("BERT-base: compiled lamb <= 1.6 x the one-pass floor", get(base, LAMB, "vs_floor"), 1.6)
    row("BERT-base: eager lamb <= 1.5 x AdamW(foreach=True)", get(base, EAGER), 1.5)
    row("1,000 x 256: compiled lamb <= 1.5 x AdamW(fused=True)", get(many, LAMB), 1.5)
    c = probes.get("compile_s")
    if c:
        out.append(f"| cold compile of BERT-base lamb <= 30 s | {c['base']['compile']:.1f} s | "
                   f"{'yes' if c['base']['compile'] <= 30 else '**no**'} |")
        q = c["large"]["compile"] / c["small"]["compile"]
        out.append(f"| BERT-large cold compile <= 1.2 x BERT-small's | {c['large']['compile']:.1f}"
                   f" s / {c['small']['compile']:.1f} s = {q:.2f} x | "
                   f"{'yes' if q <= 1.2 else '**no**'} |")
    mem = probes.get("memory")
    if mem:
        allowed = mem["state"] + mem["largest"]
        live = mem["live"] if mem.get("live") is not None else mem["first"]
        ok = max(live, mem["steady"], mem["fresh"]) <= allowed
        peak = ("" if mem["first"] <= allowed else
                f"; the resident peak of the first step, {mem['first']:.0f} MiB, is above it: "
                "glibc kept the freed old storage of the parameters and gradients")
        out.append(f"| a step adds <= state + one largest parameter (+ the layout) | first step "
                   f"{live:.0f} MiB kept, later steps {max(mem['steady'], mem['fresh'], 0):.0f}"
                   f" MiB; state {mem['state']:.0f} + largest {mem['largest']:.0f} = "
                   f"{allowed:.0f} MiB{peak} | {'yes (kept memory)' if ok else '**no**'} |")
    return out + [""]


def _units(results: list[dict]) -> list[str]:
    """The programs with units (issue 12) next to lamb, paired ratios."""
    out = []
    for r in results:
        rows = [(label, m) for label, m in r["methods"].items() if "vs_lamb" in m]
        if not rows:
            continue
        out += [f"## Units (LANGUAGE.md section 10) next to lamb: {TITLES.get(r['set'], r['set'])}",
                "", "Paired, per repeat, with the compiled `lamb` step and the fused AdamW "
                "step of the same group; median (min-max).", "",
                "| method | median ms | / lamb (compiled) | / AdamW (fused) |",
                "| --- | ---: | ---: | ---: |"]
        for label, m in rows:
            a, b = m["vs_lamb"], m["vs_anchor"]
            if m["anchor"] == label:
                continue
            out.append(f"| {label} | {m['median_s'] * 1e3:.2f} | {a['median']:.2f} "
                       f"({a['min']:.2f}-{a['max']:.2f}) | {b['median']:.2f} "
                       f"({b['min']:.2f}-{b['max']:.2f}) |")
        out.append("")
    return out


def _probes(probes: dict) -> list[str]:
    out = []
    c = probes.get("compile_s")
    if c:
        out += ["## Cold compile of the `lamb` step (fresh process, empty inductor cache)", "",
                "Compile: the time dynamo reports for compiling during the first step "
                "(tracing, inductor, the C++ build). The first step also lays the "
                "parameters out and creates the state, which grows with the model.", "",
                "| set | compile s (median; each run) | first step s | later step s |",
                "| --- | ---: | ---: | ---: |"]
        for name, r in c.items():
            each = ", ".join(f"{x:.1f}" for x in r.get("all", []))
            out.append(f"| {TITLES[name]} | {r['compile']:.2f} ({each}) | {r['first']:.2f} | "
                       f"{r['steady']:.3f} |")
        out.append("")
    mem = probes.get("memory")
    if mem:
        out += ["## Memory a compiled `lamb` step adds (BERT-base, MiB)", "",
                f"- the first step (creates the state; the parameters and their gradients "
                f"become views of the runtime's buffers, their old storage is freed): "
                f"resident peak {mem['first']:.0f}; kept after it {mem.get('live') or 0:.0f} "
                f"(once glibc has returned what the step freed: it keeps freed blocks "
                f"below its mmap threshold for reuse by later allocations, such as the "
                f"next forward's activations), against the state {mem['state']:.0f} and the "
                f"largest parameter {mem['largest']:.0f}",
                f"- a later step, gradients in place: {mem['steady']:.0f}",
                f"- a step with new gradient tensors (copied into the gradient buffer; the "
                f"new tensors are then freed): peak {mem['fresh']:.0f} above the resident "
                f"set before it (which held both the new gradients and the buffer, "
                f"{mem['grads']:.0f} each); afterwards {mem['after_fresh']:.0f} more than "
                f"before the new gradients existed", ""]
    return out


def markdown(results: list[dict], probes: dict, device: str, argv: str) -> str:
    lines = ["# Step-time benchmark", "",
             f"Made by: `python benchmarks/step_time.py {argv}`", "",
             f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
             "float32. Methods were timed in groups, interleaved (each repeat steps every "
             "method of the group once, in turn); ratios are per repeat, side by side.", ""]
    lines += _targets(results, probes)
    lines += _units(results)
    for r in results:
        lines += _table(r)
    lines += _probes(probes)
    return "\n".join(lines) + "\n"
