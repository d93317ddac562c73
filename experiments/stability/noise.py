"""Random-noise perturbation baseline (the paper's Table 4): LoRA + AdamW with the adapters moved along an
isotropic Gaussian direction of the same norm as MGPO's ε before each forward pass, the move removed after the
backward pass.

MGPO's ε_{t+1} = s·ρ·m_t/‖m_t‖/ḡ_t has norm ρ/ḡ_t (ρ without adaptive normalisation), ḡ the EMA of the global
gradient norm (ḡ_1 = ‖g_1‖, then β·ḡ + (1-β)·‖g‖), and is zero before the first gradient.  This class keeps the
same ḡ from the run's own gradients and only replaces the direction.  Benchmark code, not an optimizer feature.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch


class IsotropicNoise:
    def __init__(self, params: Iterable[torch.Tensor], rho: float = 0.05, ema_beta: float = 0.9,
                 adaptive_norm: bool = True, generator: Optional[torch.Generator] = None):
        self.params: List[torch.Tensor] = [p for p in params]
        self.rho, self.ema_beta, self.adaptive_norm = float(rho), float(ema_beta), bool(adaptive_norm)
        self.gbar: Optional[float] = None
        self.generator = generator
        self._saved: Optional[List[torch.Tensor]] = None
        self.last_norm = 0.0

    def norm(self) -> float:
        """‖ε‖ of the next perturbation: 0 before the first gradient, else ρ/ḡ (or ρ)."""
        if self.gbar is None:
            return 0.0
        return self.rho / self.gbar if self.adaptive_norm else self.rho

    @torch.no_grad()
    def apply(self, norm: Optional[float] = None) -> None:
        """Save θ and move the parameters to θ + ε, ε ~ isotropic with ‖ε‖ = ``norm`` (global over tensors):
        by default :meth:`norm`, from this run's own ḡ; the dose-response presets pass the ‖ε‖ an MGPO run applied
        at the same step."""
        if self._saved is not None:
            raise RuntimeError("apply() twice without remove()")
        target = self.norm() if norm is None else float(norm)
        self._saved = [p.detach().clone() for p in self.params]
        self.last_norm = 0.0
        if target == 0.0:
            return
        dev = self.generator.device if self.generator is not None else self.params[0].device
        zs = [torch.randn(p.shape, generator=self.generator, dtype=torch.float32, device=dev).to(p.device)
              for p in self.params]
        total = torch.sqrt(sum((z * z).sum() for z in zs))
        scale = target / float(total)
        for p, z in zip(self.params, zs):
            p.add_((z * scale).to(p.dtype))
        self.last_norm = target

    @torch.no_grad()
    def remove(self) -> None:
        """Restore θ exactly (a copy, not a subtraction, so rounding never accumulates)."""
        if self._saved is None:
            return
        for p, s in zip(self.params, self._saved):
            p.copy_(s)
        self._saved = None

    @torch.no_grad()
    def observe(self) -> float:
        """Fold this step's global gradient norm into ḡ (call after backward, before the optimizer step)."""
        sq = [p.grad.detach().float().pow(2).sum() for p in self.params if p.grad is not None]
        g = float(torch.sqrt(sum(sq))) if sq else 0.0
        self.gbar = g if self.gbar is None else self.ema_beta * self.gbar + (1 - self.ema_beta) * g
        return g
