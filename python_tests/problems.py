"""Small smooth non-quadratic problems over ragged shapes, evaluated in any dtype (fp32 for the optimizer,
float64 for the reference), so both sides take gradients of the same function."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

RAGGED_SHAPES = [(1, 1), (17,), (8, 300), (300, 8), (3, 5, 7)]


class Problem:
    """L(theta) = sum_i sum( a_i * logcosh(theta_i - c_i) + 0.05 * theta_i^4 ) + coupling between tensors."""

    def __init__(self, shapes: Sequence[tuple] = RAGGED_SHAPES, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.shapes = list(shapes)
        self.init = [torch.randn(s, generator=g, dtype=torch.float64) for s in self.shapes]
        self.centers = [torch.randn(s, generator=g, dtype=torch.float64) for s in self.shapes]
        self.weights = [0.5 + torch.rand(s, generator=g, dtype=torch.float64) for s in self.shapes]

    def loss(self, params: List[torch.Tensor], active: Optional[List[bool]] = None) -> torch.Tensor:
        total = 0.0
        means = []
        for i, p in enumerate(params):
            if active is not None and not active[i]:
                continue
            c = self.centers[i].to(p.dtype)
            a = self.weights[i].to(p.dtype)
            d = p - c
            total = total + (a * (torch.nn.functional.softplus(2 * d) - d)).sum() + 0.05 * (p ** 4).sum()
            means.append(p.mean())
        if len(means) > 1:
            total = total + 0.5 * torch.stack(means).prod().sin()
        return total

    def params(self, dtype=torch.float32) -> List[torch.nn.Parameter]:
        return [torch.nn.Parameter(t.to(dtype).clone()) for t in self.init]

    def grads_at(self, values: List[torch.Tensor], active=None) -> List[Optional[torch.Tensor]]:
        """Gradients of the loss at ``values`` (float64 math), None for inactive tensors."""
        xs = [v.detach().double().clone().requires_grad_(True) for v in values]
        self.loss(xs, active).backward()
        return [x.grad if (active is None or active[i]) else None for i, x in enumerate(xs)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
