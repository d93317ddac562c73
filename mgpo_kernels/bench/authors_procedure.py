"""LoRA-MGPO as the authors' public code runs it: a weight-space perturbation of the frozen base weights.

Re-implemented from its description (no code copied), for the overhead comparison of ``mgpo-bench table3``:

* before the forward of every micro-batch, for each LoRA layer ``l`` (frozen weight W0, adapters A (r x in),
  B (out x r), scaling s = alpha / r) with AdamW first moments m_A, m_B:
  ``D = s * (m_B @ A + B @ m_A)`` (out x in, the first-order change of s*B*A along the momentum),
  ``W0 += -rho * D / |D|_F * min(1 / gbar_l, 10)``; the perturbation is kept to be removed later;
* after the backward of that micro-batch: ``W0 -= perturbation`` and the per-layer EMA
  ``gbar_l = beta * gbar_l + (1 - beta) * |s * (G_B @ A + B @ G_A)|_F`` (the first value initialises it);
* norms and the EMA are Python floats, so every layer costs two host synchronisations per micro-batch
  (``.item()`` of |D|_F and of the gradient's norm), as code written this way has.

Nothing is perturbed before the optimizer has a momentum (the first step).  The optimizer itself is plain AdamW
(with ``clip_grad_norm_`` before it), as in the authors' training loop.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor, nn


def lora_layers(model: nn.Module):
    """(module, A, B, scaling) of every peft LoRA linear layer with the active adapter."""
    out = []
    for _, mod in model.named_modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and hasattr(mod, "base_layer")):
            continue
        names = list(getattr(mod, "active_adapters", None) or ["default"])
        name = names[0]
        if name not in mod.lora_A:
            continue
        out.append((mod, mod.lora_A[name].weight, mod.lora_B[name].weight, float(mod.scaling[name])))
    return out


class AuthorsProcedure:
    """Call :meth:`before_forward` before each micro-batch's forward and :meth:`after_backward` after its
    backward; the optimizer (torch AdamW) steps as usual."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rho: float = 0.01, beta: float = 0.8,
                 max_scale: float = 10.0):
        self.layers = lora_layers(model)
        if not self.layers:
            raise ValueError("no LoRA layers found in the model")
        self.opt = optimizer
        self.rho, self.beta, self.max_scale = rho, beta, max_scale
        self.gbar: List[float] = [0.0] * len(self.layers)
        self.saved: List[Optional[Tensor]] = [None] * len(self.layers)
        self.host_syncs = 0

    def _moments(self, A: Tensor, B: Tensor):
        sa, sb = self.opt.state.get(A), self.opt.state.get(B)
        if not sa or not sb or "exp_avg" not in sa or "exp_avg" not in sb:
            return None
        return sa["exp_avg"], sb["exp_avg"]

    @torch.no_grad()
    def before_forward(self) -> None:
        for i, (mod, A, B, s) in enumerate(self.layers):
            mom = self._moments(A, B)
            if mom is None:
                continue
            m_A, m_B = mom
            W = mod.base_layer.weight
            D = s * (m_B @ A + B @ m_A)
            dn = float(D.norm())  # host synchronisation
            self.host_syncs += 1
            if not (dn > 0 and math.isfinite(dn)):
                continue
            scale = min(1.0 / self.gbar[i], self.max_scale) if self.gbar[i] > 0 else self.max_scale
            P = D.mul_(-self.rho * scale / dn).to(W.dtype)
            W.add_(P)
            self.saved[i] = P

    @torch.no_grad()
    def after_backward(self) -> None:
        for i, (mod, A, B, s) in enumerate(self.layers):
            P = self.saved[i]
            if P is not None:
                mod.base_layer.weight.sub_(P)
                self.saved[i] = None
            if A.grad is None or B.grad is None:
                continue
            gn = float((s * (B.grad @ A + B @ A.grad)).norm())  # host synchronisation
            self.host_syncs += 1
            self.gbar[i] = gn if self.gbar[i] == 0.0 else self.beta * self.gbar[i] + (1.0 - self.beta) * gn
