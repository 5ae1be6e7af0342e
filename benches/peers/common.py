"""Shared helpers of the peer harness: thread setup, the machine's sgemm rate, load average."""
import os
import time

import torch


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def sgemm_rate(n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of an n^3 float32 matmul in torch (warm, `reps` timed)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2.0 * n**3 * reps / (time.perf_counter() - t)


def timed(step, iters: int, warmup: int = 1) -> float:
    """Seconds per call of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t) / iters
