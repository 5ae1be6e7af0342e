#!/usr/bin/env python3
"""The gpu_shape JSON files of a directory as one markdown table (benches/RESULTS.md).

usage: benches/gpu_shape/table.py DIR

One row per run: counts per training step after the first (emulated run, or the target scaled
from it), and the roofline prediction for the H100 SXM and the H200 against the floor.
Predictions are labelled as such; nothing here is a GPU measurement unless the run's device
was a GPU (then its measured step time is a column too).
"""
import glob
import json
import os
import sys


def fmt(v, digits=0):
    if v is None:
        return ""
    if isinstance(v, float) and digits == 0:
        return f"{v:,.0f}" if abs(v - round(v)) < 1e-6 else f"{v:,.1f}"
    return f"{v:,.{digits}f}"


def main():
    d = sys.argv[1]
    rows = []
    for path in sorted(glob.glob(os.path.join(d, "*.json"))):
        j = json.load(open(path))
        t = j["target"]["counts"]
        r = j["run"]["counts"]
        pred = {p["device"]: p for p in j["predicted"]}
        h100, h200 = pred.get("H100 SXM"), pred.get("H200")
        name = f"{j['dims']} {j['method']} {j['dtype']} {'+'.join(j['projections'])}"
        gpu = j.get("gpu") or {}
        rows.append([
            name,
            "emulated" if j["emulated"] else "GPU",
            fmt(t["kernel_launches"]),
            fmt(t["gemm_bf16"] + t["gemm_tf32"]),
            fmt(t["gemm_fp32"]),
            fmt(t["host_syncs"]),
            fmt(r["max_launches_per_layer"]),
            fmt(r["allocations"]),
            fmt(j["run"]["peak_device_bytes"] / 1e9, 2),
            "yes" if j.get("emulator_check") else "no",
            fmt(h100["total_s"] * 1e3, 1),
            fmt(h100["floor_s"] * 1e3, 1),
            fmt(h100["total_s"] / h100["floor_s"], 2),
            fmt(h200["total_s"] * 1e3, 1),
            fmt(h200["total_s"] / h200["floor_s"], 2),
            fmt(gpu.get("step_ms"), 1) if gpu else "",
        ])
    head = ["run", "device", "launches (target)", "cuBLAS tensor-core (target)", "cuBLAS FP32 cores (target)",
            "host waits (target)", "launches + cuBLAS in one layer (run)", "allocations (run)",
            "peak GB (run)", "emulator check", "H100 predicted ms", "H100 floor ms", "H100 / floor",
            "H200 predicted ms", "H200 / floor", "GPU measured ms"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
