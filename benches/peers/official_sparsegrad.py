"""The official SparseGrad algorithm (Chekalina et al., EMNLP 2024) as its PyTorch code runs
it, written from the paper: the weight is stored transformed (Wt = P^T W Q), the forward
is three matmuls (x Q, then Wt^T, then P^T), the backward forms the dense gradient
dWt = gt^T xt, keeps its top-k entries by magnitude (topk, where, to_sparse) and hands a
sparse gradient to torch.optim.SparseAdam. dx = (g P) Wt Q^T is computed (exact)."""
import torch


class _SparseGradFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wt, bias, p, q, k):
        xt = x @ q
        y = (xt @ wt.t()) @ p.t()
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(xt, wt, p, q)
        ctx.k = k
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        xt, wt, p, q = ctx.saved_tensors
        gt = g @ p
        dx = (gt @ wt) @ q.t() if ctx.needs_input_grad[0] else None
        dwt = gt.t() @ xt  # dense (out, in): the gradient in the sparse basis
        flat = dwt.abs().flatten()
        thr = torch.topk(flat, ctx.k, sorted=False).values.min()
        dwt = torch.where(dwt.abs() >= thr, dwt, torch.zeros_like(dwt)).to_sparse()
        db = g.sum(0) if ctx.has_bias else None
        return dx, dwt, db, None, None, None


class SparseGradLinear(torch.nn.Module):
    """y = x W^T + b with W held as Wt = P^T W Q and a top-k sparse gradient for Wt."""

    def __init__(self, weight, bias, p, q, keep: float):
        super().__init__()
        self.register_buffer("p", p)
        self.register_buffer("q", q)
        self.wt = torch.nn.Parameter(p.t() @ weight @ q)
        self.bias = None if bias is None else torch.nn.Parameter(bias.clone())
        self.k = max(1, int(round(keep * weight.numel())))

    def forward(self, x):
        shape = x.shape
        y = _SparseGradFn.apply(x.reshape(-1, shape[-1]), self.wt, self.bias, self.p, self.q, self.k)
        return y.reshape(*shape[:-1], y.shape[-1])


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q.contiguous()
