"""Which torch ops eosflow's Hessian-vector products can go through: ``torch.autograd.gradgradcheck``
(the second derivative by double backward against finite differences of the first, float64) on small
inputs of the layers, activations and losses a model is likely to use.

    .venv/bin/python benchmarks/torch_double_backward.py

Prints one line per op that fails, then the count. An op that fails here is one whose HVPs torch gets
wrong (``torch._weight_norm`` in torch 2.13: eosflow refuses a model that uses it) or cannot take
(the CPU's fused attention kernel: eosflow evaluates attention through the math kernel instead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd import gradgradcheck
from torch.nn.attention import SDPBackend, sdpa_kernel


def cases() -> dict[str, tuple[Callable, tuple]]:
    """{name: (function of the inputs, inputs)}; every input random, float64, requiring grad; constants fixed."""
    torch.manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x4, x2, w2, wc = r(2, 3, 5, 5), r(4, 6), r(6, 6), r(4, 3, 3, 3)
    g6, b6, gc, bc = r(6), r(6), r(3), r(3)
    probabilities, labels = torch.rand(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3])

    def attention(q: torch.Tensor) -> torch.Tensor:
        q = q.view(2, 2, 3, 2)
        return F.scaled_dot_product_attention(q, q, q)

    def attention_math(q: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]):
            return attention(q)

    return {
        "layer_norm": (lambda x, g, b: F.layer_norm(x, (6,), g, b), (x2, g6, b6)),
        "rms_norm": (lambda x, g: F.rms_norm(x, (6,), g), (x2, g6)),
        "group_norm": (lambda x, g, b: F.group_norm(x, 3, g, b), (x4, gc, bc)),
        "batch_norm (batch statistics)": (
            lambda x, g, b: F.batch_norm(x, None, None, g, b, training=True),
            (x4, gc, bc),
        ),
        "instance_norm": (lambda x, g, b: F.instance_norm(x, weight=g, bias=b), (x4, gc, bc)),
        "gelu": (F.gelu, (x2,)),
        "gelu (tanh)": (lambda x: F.gelu(x, approximate="tanh"), (x2,)),
        "silu": (F.silu, (x2,)),
        "mish": (F.mish, (x2,)),
        "softplus": (F.softplus, (x2,)),
        "elu": (F.elu, (x2,)),
        "selu": (F.selu, (x2,)),
        "logsigmoid": (F.logsigmoid, (x2,)),
        "log_softmax": (lambda x: F.log_softmax(x, 1), (x2,)),
        "logsumexp": (lambda x: torch.logsumexp(x, 1), (x2,)),
        "normalize": (lambda x: F.normalize(x, dim=1), (x2,)),
        "cosine_similarity": (lambda x, w: F.cosine_similarity(x, w[:4], dim=1), (x2, w2)),
        "conv2d": (lambda x, w: F.conv2d(x, w, padding=1), (x4, wc)),
        "conv_transpose2d": (lambda x, w: F.conv_transpose2d(x, w.transpose(0, 1)[:, :3], stride=2), (x4, wc)),
        "avg_pool2d": (lambda x: F.avg_pool2d(x, 2), (x4,)),
        "adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, 2), (x4,)),
        "interpolate (bilinear)": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), (x4,)),
        "interpolate (bicubic)": (lambda x: F.interpolate(x, scale_factor=2, mode="bicubic"), (x4,)),
        "grid_sample": (lambda x, grid: F.grid_sample(x, torch.tanh(grid), align_corners=False), (x4, r(2, 4, 4, 2))),
        "glu": (lambda x: F.glu(x, 1), (x2,)),
        "prelu": (lambda x, a: F.prelu(x, a[:1]), (x2, g6)),
        "embedding": (lambda w: F.embedding(torch.tensor([[0, 2], [1, 1]]), w), (w2,)),
        "cross_entropy (label smoothing)": (lambda x: F.cross_entropy(x, labels, label_smoothing=0.1), (x2,)),
        "binary_cross_entropy_with_logits": (lambda x: F.binary_cross_entropy_with_logits(x, probabilities), (x2,)),
        "huber_loss": (lambda x: F.huber_loss(x, torch.zeros_like(probabilities), delta=0.5), (x2,)),
        "cumsum": (lambda x: torch.cumsum(x, 1), (x2,)),
        "atan2": (lambda x, w: torch.atan2(x, w[:4]), (x2, w2)),
        "rfft (modulus)": (lambda x: torch.fft.rfft(x, dim=1).abs(), (x2,)),
        "scaled_dot_product_attention (default kernel)": (attention, (r(24),)),
        "scaled_dot_product_attention (math kernel)": (attention_math, (r(24),)),
        "_weight_norm (weight_norm's op)": (lambda v, g: torch._weight_norm(v, g[:4].view(4, 1), 0), (x2, g6)),
    }


def main() -> None:
    checked = cases()
    failed = 0
    for name, (function, inputs) in checked.items():
        try:
            verdict = "ok" if gradgradcheck(function, inputs, raise_exception=False) else "wrong second derivative"
        except RuntimeError as error:
            verdict = f"no second derivative: {str(error).splitlines()[0]}"
        if verdict != "ok":
            failed += 1
            print(f"{name}: {verdict}")
    print(f"torch {torch.__version__}: {len(checked)} ops checked, {failed} failed")


if __name__ == "__main__":
    main()
