"""Peer job (a): one linear layer's training step at T tokens with dx, in PyTorch:
dense nn.Linear + AdamW, and the official SparseGrad algorithm + SparseAdam (bias AdamW).
Inputs as in benches/cpu_layer.rs: random x, g with every 4th token row zero, keep 1%.
Prints one `PEER layer ...` line per variant (ms/step)."""
import argparse

import torch

from common import load, setup, sgemm_rate, timed
from official_sparsegrad import SparseGradLinear, random_orthogonal


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=int, default=3072)
    ap.add_argument("--inp", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    setup(a.threads)
    print(f"PEER sgemm {sgemm_rate() / 1e9:.1f} GFLOP/s (torch {torch.__version__}, {a.threads} threads) {load()}")
    x = torch.randn(a.tokens, a.inp, requires_grad=True)
    g = torch.randn(a.tokens, a.out)
    g[3::4] = 0.0
    w = torch.randn(a.out, a.inp) * 0.02
    b = torch.randn(a.out) * 0.02

    dense = torch.nn.Linear(a.inp, a.out)
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.bias.copy_(b)
    opt = torch.optim.AdamW(dense.parameters(), lr=1e-4)

    def dense_step():
        x.grad = None
        opt.zero_grad(set_to_none=True)
        dense(x).backward(g)
        opt.step()

    sg = SparseGradLinear(w, b, random_orthogonal(a.out, 7), random_orthogonal(a.inp, 8), 0.01)
    sopt = torch.optim.SparseAdam([sg.wt], lr=1e-4)
    bopt = torch.optim.AdamW([sg.bias], lr=1e-4)

    def sg_step():
        x.grad = None
        sopt.zero_grad(set_to_none=True)
        bopt.zero_grad(set_to_none=True)
        sg(x).backward(g)
        sopt.step()
        bopt.step()

    shape = f"{a.inp}->{a.out} T={a.tokens}"
    ms = timed(dense_step, a.iters) * 1e3
    print(f"PEER layer {shape} dense nn.Linear + AdamW, with dx: {ms:.1f} ms/step {load()}")
    ms = timed(sg_step, a.iters) * 1e3
    print(f"PEER layer {shape} official SparseGrad + SparseAdam, with dx: {ms:.1f} ms/step {load()}")


if __name__ == "__main__":
    main()
