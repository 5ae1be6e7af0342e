"""Peer job (b): the basis the official way: stack N gradients (out, in) and take
torch.linalg.svd of both unfoldings, (out, in N) and (in, out N). Writes the same seeded
gradients to a safetensors file (tensor `up_proj`, [N, out, in]) for `sparsegrad basis`,
so both sides decompose the same data. Gradients: rank-32 structure + uniform noise 0.05."""
import argparse
import resource
import time

import torch
from safetensors.torch import save_file

from common import load, setup


def gradients(n: int, out: int, inp: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(out, 32, generator=gen)
    v = torch.randn(32, inp, generator=gen)
    gs = torch.empty(n, out, inp)
    for i in range(n):
        c = torch.randn(32, generator=gen)
        gs[i] = (u * c) @ v / 32.0 + 0.05 * (torch.rand(out, inp, generator=gen) * 2 - 1)
    return gs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--out", type=int, default=3072)
    ap.add_argument("--inp", type=int, default=768)
    ap.add_argument("--write", help="also write the gradients here for `sparsegrad basis`")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    setup(a.threads)
    gs = gradients(a.n, a.out, a.inp)
    if a.write:
        save_file({"up_proj": gs.contiguous()}, a.write)
        print(f"wrote {a.n} gradients {a.out}x{a.inp} to {a.write}")
        return
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    mode1 = gs.permute(1, 2, 0).reshape(a.out, a.inp * a.n)  # (out, in N)
    p, s1, _ = torch.linalg.svd(mode1, full_matrices=False)
    del mode1
    mode2 = gs.permute(2, 1, 0).reshape(a.inp, a.out * a.n)  # (in, out N)
    q, s2, _ = torch.linalg.svd(mode2, full_matrices=False)
    secs = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"PEER basis N={a.n} {a.out}x{a.inp}: torch.linalg.svd of both unfoldings {secs:.1f} s, "
          f"peak RSS {rss / 1e6:.2f} GB (before the SVDs {rss0 / 1e6:.2f} GB) "
          f"sigma1 {s1[0].item():.4g} {s2[0].item():.4g} {load()}")


if __name__ == "__main__":
    main()
