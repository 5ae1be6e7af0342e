"""Peer job (c): fine-tune the MLP blocks of SmolLM2-135M (blocks 23, 26, 29; batch 8 x 32)
in PyTorch + transformers, the way a user would: SparseGrad 1% with the official
algorithm (official_sparsegrad.py; one basis per projection type, as ours), LoRA rank 4
with PEFT, or full fine-tuning of those MLPs with AdamW. Everything else is frozen, so
autograd stops below block 23 exactly as ours does. Batches are full 8 x 32 token
batches (our example pads every batch to 8 x 32, so the work per step is the same);
prints the step time and the padded tokens/s (batch * seq_len / step time)."""
import argparse
import statistics
import os
import time

import torch

from common import load, setup
from official_sparsegrad import SparseGradLinear, random_orthogonal

PROJ = ("gate_proj", "up_proj", "down_proj")


def load_model(path: str):
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(path))
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, local_files_only=True)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    m.config.use_cache = False
    return m


def prepare(model, method: str, blocks, keep: float, rank: int):
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(PROJ),
                         layers_to_transform=list(blocks))
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, [torch.optim.AdamW(params, lr=3e-3)]
    layers = model.model.layers
    if method == "full":
        params = []
        for b in blocks:
            for name in PROJ:
                params += list(getattr(layers[b].mlp, name).parameters())
        for p in params:
            p.requires_grad_(True)
        return model, [torch.optim.AdamW(params, lr=3e-3)]
    assert method == "sparsegrad"
    bases = {}
    wts = []
    for b in blocks:
        mlp = layers[b].mlp
        for i, name in enumerate(PROJ):
            lin = getattr(mlp, name)
            out, inp = lin.weight.shape
            if name not in bases:
                bases[name] = (random_orthogonal(out, 10 + i), random_orthogonal(inp, 20 + i))
            p, q = bases[name]
            sg = SparseGradLinear(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), p, q, keep)
            setattr(mlp, name, sg)
            wts.append(sg.wt)
    return model, [torch.optim.SparseAdam(wts, lr=3e-3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a GGUF file or a Hugging Face directory")
    ap.add_argument("--method", choices=["sparsegrad", "lora", "full"], required=True)
    ap.add_argument("--blocks", default="23,26,29")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--keep", type=float, default=0.01)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    setup(a.threads)
    blocks = [int(b) for b in a.blocks.split(",")]
    model, opts = prepare(load_model(a.model), a.method, blocks, a.keep, a.rank)
    model.train()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, vocab, (a.batch, a.seq_len), generator=gen)
        for o in opts:
            o.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        for o in opts:
            o.step()

    step()  # warm-up
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    # The median step, as ours reports it (the steps after its first).
    secs = statistics.median(times)
    tok = a.batch * a.seq_len / secs
    print(f"PEER finetune {a.method}: {secs * 1e3:.0f} ms/step, {tok:.1f} padded tok/s "
          f"(median of {a.steps} steps after a warm-up, mean {statistics.mean(times) * 1e3:.0f} ms; "
          f"torch {torch.__version__}, {a.threads} threads) {load()}")


if __name__ == "__main__":
    main()
