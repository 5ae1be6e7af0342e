"""Reads a run.sh log and prints each job's two sides and their ratio (peer / ours for
times, ours / peer for throughputs), pairing each peer figure with ours from the same round."""
import re
import sys


# A cpu_layer table row: shape name (ending in `in->out`), precision, variant, ms/step,
# x dense, flop-model ms, x model, and (f32) the GEMM-time model's ms and ratio.
OURS_LAYER = re.compile(
    r"^.*?(\d+->\d+)\s+(?:Full|Bf16)\s+(.+?)\s{2,}([\d.]+)\s+[\d.]+x\s+[\d.]+\s+([\d.]+)x"
    r"(?:\s+(?:[\d.]+|-)\s+(?:[\d.]+x|-))?\s*$"
)


def main(path):
    lines = open(path).read().splitlines()
    out = []
    peer_layer, ours_layer = [], []
    peer_ft, ours_ft = {}, {}
    basis_peer = basis_ours = None
    sgemm = []
    pending_ft = pending_step = None
    for ln in lines:
        if m := re.match(r"PEER sgemm ([\d.]+) GFLOP/s", ln):
            sgemm.append(("torch", float(m.group(1))))
        if m := re.match(r"measured sgemm rate \(2048\^3\): ([\d.]+) GFLOP/s", ln):
            sgemm.append(("ours (OpenBLAS)", float(m.group(1))))
        if m := re.match(r"PEER layer (\d+->\d+) T=(\d+) (dense|official).*?: ([\d.]+) ms/step", ln):
            peer_layer.append((m.group(1), m.group(2), m.group(3), float(m.group(4))))
        if m := OURS_LAYER.match(ln):
            ours_layer.append((m.group(1), m.group(2), float(m.group(3)), float(m.group(4))))
        if m := re.match(r"PEER basis .*? ([\d.]+) s, peak RSS ([\d.]+) GB", ln):
            basis_peer = (float(m.group(1)), float(m.group(2)))
        if m := re.match(r"OURS basis: ([\d.]+) s wall, .*peak RSS (\d+) KB", ln):
            basis_ours = (float(m.group(1)), int(m.group(2)) / 1e6)
        if m := re.match(r"PEER finetune (\w+): ([\d.]+) ms/step", ln):
            peer_ft.setdefault(m.group(1), []).append(float(m.group(2)))
        if m := re.search(r"training steps ([\d.]+) s", ln):
            pending_ft = float(m.group(1))
        if m := re.search(r"step time\s+([\d.]+) ms", ln):
            pending_step = float(m.group(1))
        if (m := re.match(r"OURS finetune (\w+): (\d+) steps", ln)) and pending_ft is not None:
            # Like the peer's: the median step after the first; older logs: the mean of all.
            ms = pending_step if pending_step is not None else pending_ft / int(m.group(2)) * 1e3
            ours_ft.setdefault(m.group(1), []).append(ms)
            pending_ft = pending_step = None
    for who, r in sgemm:
        out.append(f"sgemm 2048^3 {who}: {r:.1f} GFLOP/s")
    # Pair the i-th peer figure of a shape with the i-th of ours (one per round).
    for shape in dict.fromkeys(sh for sh, _, _, _ in peer_layer):
        tokens = next(t for sh, t, _, _ in peer_layer if sh == shape)
        pd = [ms for sh, _, k, ms in peer_layer if sh == shape and k == "dense"]
        po = [ms for sh, _, k, ms in peer_layer if sh == shape and k == "official"]
        ours = [(v, ms, vs) for sh, v, ms, vs in ours_layer if sh == shape]
        od = [ms for v, ms, _ in ours if v.startswith("dense")]
        om = [(ms, vs) for v, ms, vs in ours if v.startswith("SparseGrad Merged Exact")]
        ot = [ms for v, ms, _ in ours if v.startswith("SparseGrad Transformed Exact")]
        for i in range(min(len(pd), len(od))):
            out.append(f"layer {shape} T={tokens} round {i + 1}: dense peer {pd[i]:.0f} ms, ours {od[i]:.0f} ms "
                       f"(peer/ours {pd[i] / od[i]:.2f}x)")
        for i in range(min(len(po), len(om))):
            out.append(f"layer {shape} T={tokens} round {i + 1}: official SparseGrad {po[i]:.0f} ms, ours merged "
                       f"{om[i][0]:.0f} ms (peer/ours {po[i] / om[i][0]:.2f}x; {om[i][1]:.2f}x its flop model), "
                       f"ours transformed {ot[i] if i < len(ot) else float('nan'):.0f} ms")
    if basis_peer and basis_ours:
        out.append(f"basis N=30 3072x768: peer {basis_peer[0]:.1f} s {basis_peer[1]:.2f} GB, ours "
                   f"{basis_ours[0]:.1f} s {basis_ours[1]:.2f} GB (peer/ours {basis_peer[0] / basis_ours[0]:.1f}x)")
    for m in ("sparsegrad", "lora", "full"):
        if m in peer_ft and m in ours_ft:
            p, o = peer_ft[m][0], ours_ft[m][0]
            out.append(f"finetune {m}: peer {p:.0f} ms/step = {256e3 / p:.0f} tok/s, ours {o:.0f} ms/step = "
                       f"{256e3 / o:.0f} tok/s (padded 8x32 tokens; ours/peer {p / o:.2f}x)")
    print("\n".join(["== summary"] + out))


if __name__ == "__main__":
    main(sys.argv[1])
