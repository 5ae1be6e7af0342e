"""Summarise `perf script -F tid,time,ip,sym` output of a llama_mlp_finetune run: the
samples (all threads) between the first and last sample inside LlamaModel::train_step,
split by what the leaf is doing and, for the main thread, by the model-level caller.
usage: perf script -i perf.data -F tid,time,ip,sym | python3 fold_perf.py"""
import collections
import re
import sys

CALLERS = [
    "LlamaMlp<B,F>::backward", "LlamaMlp<B,F>::forward", "attention", "rms_norm", "rmsnorm",
    "lm_head", "cross_entropy", "logits", "embed", "rope", "swiglu", "silu", "softmax",
    "LlamaModel<B,F>::backward", "LlamaModel<B,F>::forward", "step", "optim",
]


def samples(lines):
    head, frames = None, []
    for ln in lines:
        if not ln.strip():
            if head:
                yield head, frames
            head, frames = None, []
        elif not ln.startswith("\t") and not ln.startswith(" " * 8):
            head, frames = ln.split(), []
        else:
            parts = ln.strip().split(None, 1)
            frames.append(parts[1] if len(parts) > 1 else parts[0])
    if head:
        yield head, frames


def leaf_kind(frames):
    leaf = frames[0] if frames else "?"
    if re.search(r"sgemm_kernel|sgemm_.*copy|sgemm_beta", leaf):
        return "sgemm (kernel + packing)"
    if re.search(r"dgemm|dsy|dlarf|dcopy|dtrmm|dlas|dorm|dgem", leaf):
        return "f64 BLAS/LAPACK"
    if "sched_yield" in leaf or any("sched_yield" in f for f in frames[:6]):
        return "sched_yield (BLAS/rayon threads waiting)"
    if "clear_page" in leaf or "page_fault" in " ".join(frames[:8]) or "do_anonymous_page" in leaf:
        return "page faults / zeroing (fresh allocations)"
    if "memmove" in leaf or "memcpy" in leaf or "memset" in leaf:
        return "memcpy/memset"
    if "exp" in leaf and "libm" not in leaf:
        return "expf"
    if "[k]" in leaf or leaf.startswith("0xffff") or "kernel" in leaf:
        return "kernel (other)"
    return "other: " + re.sub(r"<.*>", "<>", leaf)[:70]


def main():
    recs = []
    for head, frames in samples(sys.stdin):
        tid, t = head[0], float(head[1].rstrip(":"))
        recs.append((tid, t, frames))
    train = [t for tid, t, fr in recs if any("train_step" in f for f in fr)]
    lo, hi = min(train), max(train)
    inwin = [(tid, fr) for tid, t, fr in recs if lo <= t <= hi]
    kinds = collections.Counter(leaf_kind(fr) for _, fr in inwin)
    n = len(inwin)
    print(f"samples in the training window ({hi - lo:.1f} s, all threads): {n}")
    for k, c in kinds.most_common(14):
        print(f"  {100 * c / n:5.1f}%  {k}")
    main_tid = collections.Counter(tid for tid, t, fr in recs if any("train_step" in f for f in fr)).most_common(1)[0][0]
    callers = collections.Counter()
    mains = [fr for tid, fr in inwin if tid == main_tid]
    for fr in mains:
        hit = "other"
        for f in fr:
            if "sparsegrad::" in f and not re.search(r"backend::(operand|cpu::dense|cpu::Cpu)|Backend>::gemm|as sparsegrad::backend", f):
                hit = re.sub(r"\s*\(inlined\)", "", f)
                hit = re.sub(r"^.*?sparsegrad::", "", hit)[:90]
                break
        callers[hit] += 1
    print(f"main-thread samples in the window: {len(mains)}, by innermost sparsegrad function (BLAS wrappers skipped):")
    for k, c in callers.most_common(25):
        print(f"  {100 * c / len(mains):5.1f}%  {k}")


if __name__ == "__main__":
    main()
