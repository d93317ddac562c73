"""Random parameters and gradients for a list of shapes, the same draws in every benchmark.

Values are never zeros (a zero gradient or momentum would let a kernel take a shortcut no training run takes);
their scale is that of LoRA adapters (N(0, 0.02) weights, N(0, 1e-3) gradients) and does not change the work.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

PARAM_STD, GRAD_STD = 0.02, 1e-3


def random_params(shapes: Sequence[Sequence[int]], gen: torch.Generator, device=None,
                  dtype: torch.dtype = torch.float32, std: float = PARAM_STD) -> List[Tensor]:
    """Leaf tensors requiring grad, drawn in fp32 from ``gen`` (on ``gen``'s device) and cast to ``dtype``."""
    return [torch.randn(s, generator=gen, device=device).mul_(std).to(dtype).requires_grad_(True) for s in shapes]


def refill(grads: List[Tensor], gen: torch.Generator, std: float = GRAD_STD) -> None:
    """Fresh random gradients in place, between timed steps."""
    for g in grads:
        g.normal_(0.0, std, generator=gen)


def params_sharing_grads(shapes, device, gen: torch.Generator, grads: List[Tensor]) -> List[Tensor]:
    """fp32 parameters on ``device`` whose ``.grad`` are ``grads``: several optimizers can step on the same
    gradients, refilled once before each step."""
    params = random_params(shapes, gen, device=device)
    for p, g in zip(params, grads):
        p.grad = g
    return params


def params_with_grads(shapes, seed: int = 0, dtype: torch.dtype = torch.float32, param_std: float = PARAM_STD,
                      grad_std: float = GRAD_STD) -> List[Tensor]:
    """CPU parameters each with a gradient of its own, all drawn from one generator seeded with ``seed``
    (parameters first, then gradients): the same tensors for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    params = random_params(shapes, gen, dtype=dtype, std=param_std)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).mul_(grad_std).to(dtype)
    return params
