#!/usr/bin/env python3
"""gpu-report.py: turn the files scripts/gpu-run.sh wrote into $OUT into a dated
benches/RESULTS.md section (markdown): device, driver, commit, command; every test's result;
every timing beside its prediction and the PyTorch peer's figure from the same run.

    python3 scripts/gpu-report.py OUT_DIR [--append benches/RESULTS.md]

Prints the section (or appends it to the named file). Fails (exit 1, one `missing:` line
each) when a file or a part is missing from OUT_DIR: a run that lost a part must not read as
a complete result. Output of a rehearsal (`gpu-run.sh --rehearse`, the emulated device) is
labelled everywhere: every figure is marked "emulated - not a GPU result", and a stub peer
gives no figure at all.
"""
import argparse
import json
import os
import re
import sys

FILES = ["summary.txt", "preflight.log", "tests.log", "bench.log", "shape.log", "shape.jsonl", "peer.log",
         "peer.jsonl"]
PARTS = ["preflight", "tests", "kernels", "layer", "shape", "peer"]
EMU = "emulated - not a GPU result"


class Report:
    def __init__(self, emulated):
        self.emulated = emulated
        self.lines = []

    def add(self, *lines):
        self.lines.extend(lines)

    def fig(self, v, fmt="{:.3f}", unit=""):
        """One figure, marked when emulated."""
        if v is None:
            return "-"
        s = fmt.format(v) + unit
        return f"{s} (emulated)" if self.emulated else s

    def caption(self, text):
        self.add("", f"{text}" + (f" **[{EMU}]**" if self.emulated else ""), "")


def read(d, name):
    with open(os.path.join(d, name), errors="replace") as f:
        return f.read()


def jsonl(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"unparsed": line})
    return out


def check(d):
    """Missing files and parts: one message each."""
    missing = []
    for f in FILES:
        p = os.path.join(d, f)
        if not os.path.isfile(p):
            missing.append(f"file {f}")
    if "file summary.txt" in missing:
        return missing, {}
    summary = read(d, "summary.txt")
    parts = {}
    for m in re.finditer(r"^part (\S+) rc=(-?\d+) seconds=(\d+) limit=(\d+)(.*)$", summary, re.M):
        parts[m.group(1)] = dict(rc=int(m.group(2)), seconds=int(m.group(3)), limit=int(m.group(4)),
                                 note=m.group(5).strip())
    for p in PARTS:
        if p not in parts:
            missing.append(f"part {p} (no `part {p}` line in summary.txt)")
    if not re.search(r"^gpu-run: mode=(gpu|rehearse)$", summary, re.M):
        missing.append("the mode line of summary.txt")
    if not re.search(r"^result: (PASS|FAIL)$", summary, re.M):
        missing.append("the result line of summary.txt (the run did not finish)")
    # Each part's own output must be there too.
    if not missing:
        tests = read(d, "tests.log")
        bench = read(d, "bench.log")
        if "===== " not in tests:
            missing.append("part tests: tests.log has no test binary's output")
        if "===== cuda_kernels" not in bench:
            missing.append("part kernels: bench.log has no cuda_kernels section")
        if "===== cuda_layer" not in bench:
            missing.append("part layer: bench.log has no cuda_layer section")
        if not jsonl(read(d, "shape.jsonl")):
            missing.append("part shape: shape.jsonl is empty")
        if not jsonl(read(d, "peer.jsonl")):
            missing.append("part peer: peer.jsonl is empty")
        if "smoke_gemm:" not in read(d, "preflight.log"):
            missing.append("part preflight: preflight.log has no smoke GEMM result")
    return missing, parts


def info(summary):
    out = {}
    for m in re.finditer(r"^info (.+?): (.*)$", summary, re.M):
        out[m.group(1)] = m.group(2)
    return out


def tests_section(r, text):
    r.add("", "### Tests (every CUDA test binary)")
    r.caption("One row per binary; every test's result below it.")
    r.add("| binary | exit | passed | failed | ignored | ran on |", "| --- | --- | --- | --- | --- | --- |")
    blocks = re.split(r"^===== (\S+) rc=(\S+)\n", text, flags=re.M)
    details = []
    for i in range(1, len(blocks), 3):
        name, rc, body = blocks[i], blocks[i + 1], blocks[i + 2]
        out, _, ran = body.partition(f"----- {name} devices\n")
        results = re.findall(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", out, re.M)
        counts = {k: sum(1 for _, v in results if v == k) for k in ("ok", "FAILED", "ignored")}
        devices = sorted({ln.split(" ", 3)[3] for ln in ran.splitlines() if " executed " in ln and ln.count(" ") >= 3})
        skipped = sum(1 for ln in ran.splitlines() if " skipped " in ln)
        dev = ", ".join(devices) or "-"
        if skipped:
            dev += f" ({skipped} skipped: no device)"
        if r.emulated and devices:
            dev += " (emulated)"
        r.add(f"| {name} | {rc} | {counts['ok']} | {counts['FAILED']} | {counts['ignored']} | {dev} |")
        if not results and rc != "0":
            details.append(f"- {name}: no test result lines (exit {rc}: crashed or timed out)")
        for t, v in results:
            details.append(f"- {name} `{t}`: {v}")
    r.add("", "<details><summary>Every test's result</summary>", "", *details, "", "</details>")


KERNEL_RE = re.compile(r"^(?P<name>.+?)\s+(?P<us>[\d.]+) us\s+(?P<rate>[\d.]+) (?P<unit>GB/s|TFLOP/s)\s+(?P<pct>[\d.]+)% of (?P<of>copy|peak)\s*$")
MERGED_RE = re.compile(r"^(?P<name>.+?)\s+(?P<us>[\d.]+) us measured\s+(?P<pred>[\d.]+) us predicted \((?P<model>.*)\)\s*$")
LAYER_RE = re.compile(r"^(?P<shape>.{22}) (?P<prec>\S+)\s+(?P<variant>.*?)\s+(?P<ms>[\d.]+)\s+(?P<vd>[\d.]+)x\s+"
                      r"(?P<model>[\d.]+)\s+(?P<vm>[\d.]+)x\s+(?P<g>[\d.]+|-)\s+(?P<vg>[\d.]+x|-)\s*$")


def bench_sections(r, text, peers):
    kern, _, layer = text.partition("===== cuda_layer")
    r.add("", "### Kernels (`benches/cuda_kernels.rs`)")
    r.caption("CUDA-event time per call after warm-up; rate against the copy bandwidth or the cuBLAS peak "
              "measured in the same run (the roofline of each op); the merged update beside the roofline model's "
              "prediction.")
    head = [ln for ln in kern.splitlines() if ln.startswith(("device", "SPARSEGRAD_BENCH_TINY", "skipped"))]
    for h in head:
        r.add(f"- {h}" + (" (emulated)" if r.emulated and not h.startswith("SPARSEGRAD") else ""))
    r.add("", "| op | time (us) | achieved | of roofline | predicted (us) |", "| --- | --- | --- | --- | --- |")
    n = 0
    for ln in kern.splitlines():
        m = KERNEL_RE.match(ln)
        if m:
            n += 1
            r.add(f"| {m['name'].strip()} | {r.fig(float(m['us']), '{:.1f}')} | {r.fig(float(m['rate']), '{:.2f}', ' ' + m['unit'])} "
                  f"| {r.fig(float(m['pct']), '{:.1f}', '% of ' + m['of'])} | - |")
            continue
        m = MERGED_RE.match(ln)
        if m:
            n += 1
            r.add(f"| {m['name'].strip()} | {r.fig(float(m['us']), '{:.1f}')} | - | - | "
                  f"{r.fig(float(m['pred']), '{:.1f}')} ({m['model']}) |")
    if n == 0:
        r.add("| (no kernel figures: see bench.log) | | | | |")

    r.add("", "### Layer step (`benches/cuda_layer.rs`) beside the PyTorch peer of the same run")
    r.caption("Forward + backward (with dx) + optimizer, ms per step; flop model = the step's flops at the cuBLAS "
              "rate of this run; peer = `benches/peers/gpu_peer.py` (dense: nn.Linear + AdamW; SparseGrad: the "
              "official algorithm, transformed + exact, SparseAdam), torch.cuda.Event median after warm-up.")
    for h in [ln for ln in layer.splitlines() if ln.startswith(("device", "cuBLAS", "SPARSEGRAD_BENCH_TINY", "skipped"))]:
        r.add(f"- {h}" + (" (emulated)" if r.emulated and not h.startswith("SPARSEGRAD") else ""))
    r.add("", "| shape | prec | variant | ms/step | flop model ms | vs model | peer ms | ours / peer |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    n = 0
    for ln in layer.splitlines():
        m = LAYER_RE.match(ln)
        if not m or m["shape"].startswith("shape"):
            continue
        n += 1
        shape, prec, variant = m["shape"].strip(), m["prec"], m["variant"].strip()
        dtype = "bf16" if prec.lower().startswith("bf16") else "f32"
        pv = "dense" if variant.startswith("dense") else "official_sparsegrad"
        peer, peer_cell = peers.layer(shape, dtype, pv)
        ours = float(m["ms"])
        ratio = "-" if peer is None else r.fig(ours / peer, "{:.2f}", "x")
        r.add(f"| {shape} | {prec} | {variant} | {r.fig(ours, '{:.2f}')} | {r.fig(float(m['model']), '{:.2f}')} "
              f"| {r.fig(float(m['vm']), '{:.2f}', 'x')} | {peer_cell} | {ratio} |")
    if n == 0:
        r.add("| (no layer rows: see bench.log) | | | | | | | |")


class Peers:
    def __init__(self, r, recs):
        self.r = r
        self.recs = recs
        self.stub = any(x.get("stub") for x in recs)
        self.env = next((x for x in recs if x.get("kind") == "env"), {})

    def _cell(self, rec):
        if self.stub:
            return None, "stub: no peer figure"
        if rec is None:
            return None, "not run"
        if rec.get("stub"):
            return None, "stub: no peer figure"
        if "error" in rec:
            return None, "error: " + rec["error"][:80].replace("|", "/")
        if "skipped" in rec:
            return None, "skipped: " + rec["skipped"]
        ms = rec.get("ms")
        return ms, self.r.fig(ms, "{:.2f}")

    def layer(self, shape, dtype, variant):
        norm = lambda s: re.sub(r"\s+", " ", s.strip())
        rec = next((x for x in self.recs if x.get("kind") == "layer" and norm(x.get("shape", "")) == norm(shape)
                    and x.get("dtype") == dtype and x.get("variant") == variant), None)
        return self._cell(rec)

    def step(self, dims, method, dtype):
        rec = next((x for x in self.recs if x.get("kind") == "step" and x.get("dims") == dims
                    and x.get("method") == method and x.get("dtype") == dtype), None)
        return self._cell(rec)


def shape_section(r, runs, peers, device):
    r.add("", "### Training step (`examples/gpu_shape`) beside its prediction and the PyTorch peer")
    r.caption("Random weights; measured = CUDA events around one whole step of the slice that ran (after warm-up); "
              "predicted = the roofline model from the step's own counts, for the slice's target (the full model); "
              "peer = transformers LlamaForCausalLM with the same layers, trained blocks, projections and "
              "tokens per step (official SparseGrad / PEFT LoRA / full fine-tuning of those MLPs). bf16: ours keeps f32 "
              "master weights and runs bf16 operands; the peer holds the whole model in bf16.")
    want = "H200" if "H200" in (device or "") else "H100"
    r.add(f"Predictions for: {want} (the run's device)." if not r.emulated else
          "Predictions for: H100 SXM (counts from the emulated device).")
    r.add("", "| run | layers run | tokens | measured ms (slice) | predicted ms (target) | floor ms | peer ms (slice) | ours / peer | exit |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cats = []
    for run in runs:
        res = run.get("result")
        if not res:
            why = f"skipped: {run['skipped']}" if run.get("skipped") else f"{run.get('rc')} (no JSON)"
            r.add(f"| {run.get('name')} | - | - | - | - | - | - | - | {why} |")
            continue
        pred = next((p for p in res.get("predicted", []) if want in p.get("device", "")), None)
        gpu = res.get("gpu") or {}
        ms = gpu.get("step_ms")
        peer, peer_cell = peers.step(res["dims"], res["method"], res["dtype"])
        ratio = "-" if (peer is None or ms is None) else r.fig(ms / peer, "{:.2f}", "x")
        tokens = res.get("batch", 0) * res.get("seq", 0)
        # Layers, tokens and the exit status are the run's bookkeeping, not device figures:
        # written with their unit so no bare number stands in the table unmarked.
        r.add(f"| {run['name']} | {res['run']['layers']} (slice) | {tokens} (per step) | "
              f"{r.fig(ms, '{:.2f}') if ms is not None else ('none (emulated: counts only)' if r.emulated else '-')} "
              f"| {r.fig(pred['total_s'] * 1e3 if pred else None, '{:.2f}')} | {r.fig(pred['floor_s'] * 1e3 if pred else None, '{:.2f}')} "
              f"| {peer_cell} | {ratio} | rc {run.get('rc')} |")
        if pred:
            for cat, s in pred.get("by_category_s", {}).items():
                meas = gpu.get("by_category_s", {}).get(cat)
                cats.append(f"| {run['name']} | {cat} | {r.fig(meas * 1e3 if meas is not None else None, '{:.3f}')} "
                            f"| {r.fig(s * 1e3 if s is not None else None, '{:.3f}')} |")
    r.add("", "<details><summary>Per category: measured (sum of per-launch event times, scaled by layer) "
          "beside predicted, ms</summary>", "", "| run | category | measured | predicted |", "| --- | --- | --- | --- |",
          *cats, "", "</details>")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--append", help="append the section to this markdown file (e.g. benches/RESULTS.md)")
    a = ap.parse_args()
    missing, parts = check(a.out_dir)
    if missing:
        for m in missing:
            print(f"missing: {m}", file=sys.stderr)
        print(f"gpu-report: {a.out_dir} is not a complete gpu-run output; no report", file=sys.stderr)
        return 1
    summary = read(a.out_dir, "summary.txt")
    emulated = "gpu-run: mode=rehearse" in summary
    inf = info(summary)
    r = Report(emulated)
    date = (inf.get("date") or "?")[:10]
    title = f"## GPU run {date}: {inf.get('device', '?')}"
    if emulated:
        title = f"## GPU run rehearsal {date}: the emulated device ({EMU})"
    r.add(title, "")
    if emulated:
        r.add(f"> Rehearsal of `scripts/gpu-run.sh` on the CPU emulation of CUDA at tiny sizes: every figure in this "
              f"section is **{EMU}**, and the PyTorch peer is a **stub** (no torch there): it gives no figure.", "")
    result = re.search(r"^result: (\S+)", summary, re.M).group(1)
    total = re.search(r"^total seconds=(\d+) limit_sum=(\d+)", summary, re.M)
    r.add(f"- Device: {inf.get('device', '?')}; driver {inf.get('driver', '?')}; memory {inf.get('memory', '-')}; "
          f"clocks {inf.get('clocks', '-')}",
          f"- cuBLAS: {inf.get('cublas', '?')}",
          f"- Commit: {inf.get('bundle commit', '?')}; kernels {inf.get('bundle kernel_archs', '?')}; "
          f"built {inf.get('bundle built', '?')}",
          f"- Command: `{inf.get('command', '?')}` on {inf.get('host', '?')} at {inf.get('date', '?')}",
          f"- Result: {result}" + (f"; {total.group(1)} s of a {total.group(2)} s budget" if total else ""))
    r.add("", "| part | exit | seconds | limit |", "| --- | --- | --- | --- |")
    for p in PARTS:
        x = parts[p]
        r.add(f"| {p} | {x['rc']}{' ' + x['note'] if x['note'] else ''} | {x['seconds']} | {x['limit']} |")
    smoke = re.search(r"^smoke_gemm: rc=(\d+)", read(a.out_dir, "preflight.log"), re.M)
    r.add("", f"Smoke GEMM (cuBLAS against the CPU): {'ok' if smoke and smoke.group(1) == '0' else 'FAILED'}"
          + (" (emulated)" if emulated else ""))
    peers = Peers(r, jsonl(read(a.out_dir, "peer.jsonl")))
    if peers.stub:
        r.add("", "PyTorch peer: **stub** (no figures).")
    else:
        e = peers.env
        for x in peers.recs:
            if x.get("kind") == "error":
                r.add("", f"PyTorch peer FAILED: {x.get('error')}")
        r.add("", f"PyTorch peer: torch {e.get('torch', '?')} (CUDA {e.get('cuda', '?')}), transformers "
              f"{e.get('transformers', '?')}, PEFT {e.get('peft', '?')} on {e.get('device', '?')}")
    tests_section(r, read(a.out_dir, "tests.log"))
    bench_sections(r, read(a.out_dir, "bench.log"), peers)
    shape_section(r, jsonl(read(a.out_dir, "shape.jsonl")), peers, inf.get("device"))
    text = "\n".join(r.lines) + "\n"
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n" + text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
