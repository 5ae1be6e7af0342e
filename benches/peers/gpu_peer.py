"""The PyTorch peer of scripts/gpu-run.sh, on the same GPU in the same run as ours.

Two jobs, each timed with torch.cuda.Event after warm-up (median of the timed steps):

- step: a whole training step of a LLaMA model with random weights (transformers'
  LlamaForCausalLM built from a config: the GPU machine cannot download) at the slice that
  examples/gpu_shape ran (read from its JSON lines: dims, layers run, trained blocks,
  projections, batch x seq tokens, dtype), for the official SparseGrad algorithm
  (official_sparsegrad.py, SparseAdam; one random orthogonal basis per projection type),
  PEFT LoRA (the rank with as many parameters as SparseGrad keeps, as gpu_shape picks) and
  full fine-tuning of the same MLP projections (AdamW). f32 runs are exact f32 (TF32 off, as
  ours by default); bf16 runs hold the whole model in bf16.
- layer: one linear layer's step with dx at T tokens (as benches/cuda_layer.rs): dense
  nn.Linear + AdamW and the official SparseGrad layer + SparseAdam, BERT-base and LLaMA-2-7B
  MLP shapes, f32 and bf16.

Writes one JSON object per case to --out (JSON lines): its figures, or `error`, or
`skipped` when the time budget ran out. `--stub` (the emulator rehearsal, where there is no
torch) writes only lines marked {"stub": true} and imports nothing: a stub has no figures.

usage: python3 gpu_peer.py --shapes shape.jsonl --out peer.jsonl [--budget S] [--stub]
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

DIMS = {
    # hidden, ffn, layers, heads, kv heads, vocab (as examples/gpu_shape names them); RoPE's base
    # is left at the default: it does not change the work
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
LAYER_SHAPES = [("BERT up 768->3072", 3072, 768), ("BERT down 3072->768", 768, 3072),
                ("LLaMA up 4096->11008", 11008, 4096), ("LLaMA down 11008->4096", 4096, 11008)]
PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def emit(out, obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()
    print("PEER " + json.dumps(obj), flush=True)


def read_shapes(path):
    runs = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rec = json.loads(line)
                    if isinstance(rec.get("result"), dict):
                        runs.append(rec["result"])
    return runs


def step_cases(shapes, stub=False):
    """One peer case per (dims, dtype) that gpu_shape ran, for every peer method (a stub also
    lists the dims it has no config for, such as the rehearsal's tiny ones)."""
    seen, cases = set(), []
    for r in shapes:
        key = (r["dims"], r["dtype"])
        if key in seen or (r["dims"] not in DIMS and not stub):
            continue
        seen.add(key)
        for method in ("sparsegrad", "lora", "full"):
            cases.append(dict(dims=r["dims"], dtype=r["dtype"], method=method, layers=r["run"]["layers"],
                              trained=r["run"]["trained"], projections=r["projections"], batch=r["batch"],
                              seq=r["seq"]))
    return cases


def timed_cuda(torch, step, warmup, iters):
    """Median milliseconds of `step` between CUDA events, after `warmup` steps."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), times


_BASES = {}


def orthogonal(torch, n, seed, dtype):
    """A random orthogonal (n, n) matrix on the GPU; one QR per (n, seed) for the whole run."""
    if (n, seed) not in _BASES:
        g = torch.Generator(device="cuda").manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, device="cuda", generator=g))
        _BASES[(n, seed)] = q.contiguous()
    return _BASES[(n, seed)].to(dtype).contiguous()


def run_step(torch, c, keep, warmup, iters):
    from transformers import LlamaConfig, LlamaForCausalLM
    from official_sparsegrad import SparseGradLinear

    dtype = torch.bfloat16 if c["dtype"] == "bf16" else torch.float32
    cfg = LlamaConfig(**dict(DIMS[c["dims"]], num_hidden_layers=c["layers"]), max_position_embeddings=max(c["seq"], 2048),
                      use_cache=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    projs = [PROJ[p] for p in c["projections"]]
    ffn, hidden = cfg.intermediate_size, cfg.hidden_size
    method = c["method"]
    rank = None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        # gpu_shape's rule: the rank with as many parameters as SparseGrad keeps.
        rank = max(1, round(keep * ffn * hidden / (ffn + hidden)))
        lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=projs,
                          layers_to_transform=list(c["trained"]))
        model = get_peft_model(model, lcfg)
        opts = [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)]
    elif method == "full":
        params = []
        for b in c["trained"]:
            for name in projs:
                params += list(getattr(model.model.layers[b].mlp, name).parameters())
        for p in params:
            p.requires_grad_(True)
        opts = [torch.optim.AdamW(params, lr=1e-4)]
    else:
        bases, wts = {}, []
        for b in c["trained"]:
            mlp = model.model.layers[b].mlp
            for i, name in enumerate(projs):
                lin = getattr(mlp, name)
                out, inp = lin.weight.shape
                if name not in bases:
                    bases[name] = (orthogonal(torch, out, 10 + i, dtype), orthogonal(torch, inp, 20 + i, dtype))
                p, q = bases[name]
                sg = SparseGradLinear(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), p, q, keep)
                setattr(mlp, name, sg)
                wts.append(sg.wt)
        opts = [torch.optim.SparseAdam(wts, lr=1e-4)]
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (c["batch"], c["seq"]), device="cuda", generator=gen)

    def step():
        for o in opts:
            o.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        for o in opts:
            o.step()

    ms, times = timed_cuda(torch, step, warmup, iters)
    return dict(ms=ms, times_ms=times, trainable_params=trainable, lora_rank=rank,
                peak_bytes=torch.cuda.max_memory_allocated())


def run_layer(torch, shape, out, inp, tokens, dtype_name, variant, keep, warmup, iters):
    from official_sparsegrad import SparseGradLinear

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(tokens, inp, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, out, device=dev, dtype=dtype)
    g[3::4] = 0.0
    w = torch.randn(out, inp, device=dev, dtype=dtype) * 0.02
    b = torch.randn(out, device=dev, dtype=dtype) * 0.02
    if variant == "dense":
        lin = torch.nn.Linear(inp, out, device=dev, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        opts = [torch.optim.AdamW(lin.parameters(), lr=1e-4)]
        mod = lin
    else:
        mod = SparseGradLinear(w, b, orthogonal(torch, out, 7, dtype), orthogonal(torch, inp, 8, dtype), keep)
        opts = [torch.optim.SparseAdam([mod.wt], lr=1e-4), torch.optim.AdamW([mod.bias], lr=1e-4)]

    def step():
        x.grad = None
        for o in opts:
            o.zero_grad(set_to_none=True)
        mod(x).backward(g)
        for o in opts:
            o.step()

    ms, times = timed_cuda(torch, step, warmup, iters)
    return dict(ms=ms, times_ms=times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", help="gpu_shape's JSON lines (scripts/gpu-run.sh's shape.jsonl)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=90.0, help="seconds; later cases are skipped")
    ap.add_argument("--keep", type=float, default=0.01)
    ap.add_argument("--tokens", type=int, default=4096, help="the layer job's T")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--stub", action="store_true", help="no torch: write stub lines only (emulator rehearsal)")
    a = ap.parse_args()
    start = time.monotonic()
    shapes = read_shapes(a.shapes)
    cases = step_cases(shapes, a.stub)
    with open(a.out, "w") as out:
        if a.stub:
            note = "STUB: the emulator rehearsal runs no PyTorch peer; no peer figure exists"
            emit(out, {"kind": "env", "stub": True, "note": note})
            for c in cases:
                emit(out, dict(c, kind="step", stub=True, note=note))
            for dt in ("f32", "bf16"):
                for shape, o, i in LAYER_SHAPES:
                    for v in ("dense", "official_sparsegrad"):
                        emit(out, dict(kind="layer", shape=shape, out=o, inp=i, tokens=a.tokens, dtype=dt, variant=v,
                                       stub=True, note=note))
            return 0
        try:
            import torch
        except ImportError as e:
            emit(out, {"kind": "error", "error": f"no PyTorch here: {e}"})
            return 1

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        env = {"kind": "env", "torch": torch.__version__, "cuda": torch.version.cuda,
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
        try:
            import peft
            import transformers

            env.update(peft=peft.__version__, transformers=transformers.__version__)
        except Exception as e:  # recorded; the LoRA cases then fail one by one
            env["import_error"] = repr(e)
        emit(out, env)
        if not torch.cuda.is_available():
            emit(out, {"kind": "error", "error": "torch sees no CUDA device"})
            return 1
        failed = 0
        jobs = [("step", c) for c in cases]
        for dt in ("f32", "bf16"):
            for shape, o, i in LAYER_SHAPES:
                for v in ("dense", "official_sparsegrad"):
                    jobs.append(("layer", dict(shape=shape, out=o, inp=i, tokens=a.tokens, dtype=dt, variant=v)))
        for kind, c in jobs:
            rec = dict(c, kind=kind)
            if time.monotonic() - start > a.budget:
                rec["skipped"] = f"the peer's {a.budget:.0f} s budget ran out"
                emit(out, rec)
                continue
            t = time.monotonic()
            try:
                if kind == "step":
                    rec.update(run_step(torch, c, a.keep, a.warmup, a.iters))
                else:
                    rec.update(run_layer(torch, c["shape"], c["out"], c["inp"], c["tokens"], c["dtype"], c["variant"],
                                         a.keep, a.warmup, a.iters))
            except Exception as e:
                failed += 1
                rec["error"] = f"{type(e).__name__}: {e}"[:500]
                traceback.print_exc()
            rec["wall_s"] = round(time.monotonic() - t, 2)
            emit(out, rec)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
