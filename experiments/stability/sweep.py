"""One LoRA fine-tuning run per (method, rank, lr, seed), and the sweep over them.

Every method of a seed sees the same LoRA initialisation and the same batches in the same order; all use
torch AdamW's betas/eps, the same warm-up + cosine schedule, no gradient clipping, and the same weight decay
(passed explicitly).  MGPO runs are evaluated at θ (``opt.unperturbed()``); the noise baseline removes its move
after every backward pass, so its model is at θ already.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Dict, List

import torch

from mgpo_kernels import MGPO

from . import task
from .noise import IsotropicNoise

#: the paper's NLU defaults for every MGPO variant (no per-method tuning)
RHO, EMA_BETA = 0.05, 0.9

METHODS: Dict[str, Dict[str, Any]] = {
    "lora": {"label": "LoRA (AdamW)"},
    "mgpo": {"label": "LoRA-MGPO", "mgpo": dict(adaptive_norm=True, direction="momentum")},
    "mgpo-noapn": {"label": "MGPO w/o APN", "mgpo": dict(adaptive_norm=False, direction="momentum")},
    "noise": {"label": "random noise, ‖ε‖ of MGPO", "noise": True},
    "mgpo-neg": {"label": "MGPO, -momentum", "mgpo": dict(adaptive_norm=True, direction="-momentum")},
}


def batch_order(n: int, steps: int, batch: int, seed: int) -> List[List[int]]:
    """``steps`` batches of indices into the training split: shuffled epochs, a function of ``seed`` only."""
    gen = torch.Generator().manual_seed(1_000 + seed)
    flat: List[int] = []
    while len(flat) < steps * batch:
        flat += torch.randperm(n, generator=gen).tolist()
    return [flat[i * batch:(i + 1) * batch] for i in range(steps)]


def lr_lambda(steps: int, warmup: int):
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))
    return f


def make_optimizer(method: str, params, lr: float, weight_decay: float, seed: int, backend: str = "auto"):
    spec = METHODS[method]
    noise = None
    if "mgpo" in spec:
        opt = MGPO(params, lr=lr, weight_decay=weight_decay, rho=RHO, ema_beta=EMA_BETA, backend=backend,
                   **spec["mgpo"])
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        if spec.get("noise"):
            noise = IsotropicNoise(params, rho=RHO, ema_beta=EMA_BETA, adaptive_norm=True,
                                   generator=torch.Generator(params[0].device).manual_seed(2_000 + seed))
    return opt, noise


def add_lora(base, rank: int, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(10_000 + seed)
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(copy.deepcopy(base), cfg)


def finetune(base, data: Dict[str, Any], method: str, rank: int, lr: float, seed: int, cfg: Dict[str, Any],
             device: torch.device) -> Dict[str, Any]:
    """Train one LoRA adapter; per-step training loss, held-out loss and exact match at θ, wall times, and the
    size of the perturbation at the end (‖ε‖ read as the applied weights minus θ for MGPO) against ‖θ‖."""
    model = add_lora(base, rank, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, noise = make_optimizer(method, params, lr, cfg["weight_decay"], seed, cfg.get("mgpo_backend", "auto"))
    steps = cfg["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(1, round(cfg["warmup_frac"] * steps))))
    train = data["train"]
    losses: List[float] = []
    diverged = False
    model.train()
    t0 = time.perf_counter()
    for idx in batch_order(len(train), steps, cfg["batch"], seed):
        b = task.collate([train[i] for i in idx], data["pad_id"], device)
        if noise is not None:
            noise.apply()
        loss = model(**b).loss
        loss.backward()
        if noise is not None:
            noise.remove()
            noise.observe()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        v = loss.item()
        losses.append(v)
        if not math.isfinite(v):
            diverged = True
            break
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    eps_norm = noise.norm() if noise is not None else None
    if isinstance(opt, MGPO):  # theta at rest; the next training forward would apply eps: measure it so
        with torch.no_grad():
            theta = [p.detach().clone() for p in params]
            opt.apply_perturbation()
            eps_norm = float(torch.sqrt(sum(((p - a) ** 2).sum() for a, p in zip(theta, params))))
        with opt.unperturbed():
            eval_loss, em = task.evaluate(model, data["eval_batches"])
            with torch.no_grad():
                theta_norm = float(torch.sqrt(sum((p.float() ** 2).sum() for p in params)))
    else:
        eval_loss, em = task.evaluate(model, data["eval_batches"])
        with torch.no_grad():
            theta_norm = float(torch.sqrt(sum((p.float() ** 2).sum() for p in params)))
    return {"method": method, "rank": rank, "lr": lr, "seed": seed, "losses": losses, "diverged": diverged,
            "eval_loss": eval_loss, "exact_match": em, "train_s": train_s, "eval_s": time.perf_counter() - t1,
            "trainable_params": sum(p.numel() for p in params),
            "eps_norm_end": eps_norm, "theta_norm_end": theta_norm}


def prepare_data(tok, cfg: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    from .corpus import special_ids

    pad_id, _ = special_ids(tok)
    train, held = task.make_splits(cfg["n_train"], cfg["n_eval"], seed=0)
    ev = task.encode(tok, held)
    eb = [task.collate(ev[i:i + 64], pad_id, device) for i in range(0, len(ev), 64)]
    return {"train": task.encode(tok, train), "eval_batches": eb, "pad_id": pad_id,
            "examples": [(p.prompt + p.target) for p in train[:2]]}


def run_sweep(base, data, cfg: Dict[str, Any], device: torch.device, progress: bool = True,
              on_run=None) -> List[Dict[str, Any]]:
    from mgpo_kernels.bench import common as C

    combos = [(s, r, lr, m) for s in cfg["seeds"] for r in cfg["ranks"] for lr in cfg["lrs"] for m in cfg["methods"]]
    runs: List[Dict[str, Any]] = []
    bar = C.tqdm(combos, desc="stability sweep", disable=not progress, leave=True)
    for seed, rank, lr, method in bar:
        bar.set_postfix_str(f"seed {seed} r={rank} lr={lr:g} {method}")
        runs.append(finetune(base, data, method, rank, lr, seed, cfg, device))
        if on_run is not None:
            on_run(runs)
    bar.close()
    return runs
