"""The dose-response presets (``--preset dose``, ``dose-cuda``): does MGPO help at any ρ, on a task LoRA learns?

Three phases, one command:

1. base: a small character-level ``LlamaForCausalLM`` pre-trained here on four string operations
   (:mod:`.strings`; cached like the other presets' bases);
2. scan: plain LoRA (AdamW) fine-tuned on the unseen composition ``RS`` over r = α × lr, on *scan seeds* kept
   apart from the dose-response's seeds; the cells where LoRA learns (every scan seed ends below
   ``learned_loss``) and has the largest mean bump are chosen (``cells`` of them).  Choosing cells and measuring
   in them with other seeds keeps regression to the mean out of the comparison: a cell picked for its large LoRA
   bump on seeds s would flatter any method measured against LoRA on the same s;
3. dose-response in those cells: MGPO at ρ ∈ ``rhos`` with APN (‖ε‖ = ρ/max(ḡ, floor)) and without
   (‖ε‖ = ρ), and the random-noise control: isotropic noise replaying, step by step, the ‖ε‖ that MGPO with APN
   applied at the same ρ, seed and cell.  ρ = 0 is MGPO with ρ = 0, i.e. AdamW (plain LoRA); every run of a
   (cell, seed) has the same LoRA init and batch order, so each is paired with its ρ = 0 run.

The report gives, per cell and pooled over cells, the paired differences (run − its ρ = 0 run) of the bump, the
held-out loss and exact match: mean and 95% confidence interval from the t distribution over the seeds.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mgpo_kernels.bench import common as C

from . import base, metrics, strings, sweep, task
from ._cli import command_line
from .noise import IsotropicNoise

#: the study's variants: label, MGPO's adaptive_norm (None: the noise control)
VARIANTS: Dict[str, Dict[str, Any]] = {
    # a second rho = 0 run: torch.optim.AdamW instead of MGPO at rho = 0 -- the same arithmetic up to floating-point
    # rounding, so its difference from rho = 0 is what a perturbation of rounding size does (the null)
    "adamw": {"label": "torch AdamW (ρ = 0; rounding only)", "adaptive_norm": None},
    "mgpo": {"label": "MGPO (APN)", "adaptive_norm": True},
    "mgpo-noapn": {"label": "MGPO w/o APN", "adaptive_norm": False},
    "noise": {"label": "random noise, ‖ε‖ of MGPO (APN)", "adaptive_norm": None},
}
#: a run "solves" the task when its held-out exact match reaches this (outcomes in the bump cells are bimodal)
SOLVED = 0.5
METRICS = (("bump", "bump (training loss)", 1.0), ("eval_loss", "held-out loss", 1.0),
           ("exact_match", "held-out exact match (points)", 100.0))

_BASE = dict(study="dose", hidden=64, intermediate=172, layers=2, heads=4, seq=32, pretrain_steps=1200,
             pretrain_batch=64, pretrain_lr=3e-3)
_RUN = dict(n_train=4000, n_eval=512, batch=32, steps=300, warmup_frac=0.03, weight_decay=0.0, smooth=10,
            ema_beta=0.9, gbar_floor=0.1, learned_loss=1.0, cells=2,
            scan_ranks=[8, 32, 128], scan_lrs=[3e-3, 1e-2, 2e-2], scan_seeds=3, scan_seed0=100,
            rhos=[0.0, 0.005, 0.01, 0.02, 0.05, 0.1], variants=list(VARIANTS), n_seeds=8)

PRESETS: Dict[str, Dict[str, Any]] = {
    # a 2-core CPU (80 min measured on a shared one): a 0.1M-parameter base, 27 scan runs + 2 cells x 8 seeds x 17 runs
    "dose": {**_BASE, **_RUN},
    # a GPU (not run yet; sized by estimate, ~10 ms a step, for about 10 minutes on an H100/H200): a 3.2M-parameter
    # base, batch 64, 2 scan seeds and 5 dose-response seeds (18 + 170 runs of 300 steps)
    "dose-cuda": {**_BASE, **_RUN, "hidden": 256, "intermediate": 688, "layers": 4, "heads": 8,
                  "pretrain_steps": 2000, "pretrain_batch": 128, "pretrain_lr": 1e-3, "batch": 64,
                  "n_eval": 1024, "scan_lrs": [1e-3, 3e-3, 1e-2], "scan_seeds": 2, "n_seeds": 5},
    # for the tests: seconds
    "dose-tiny": {**_BASE, **_RUN, "hidden": 32, "intermediate": 64, "heads": 2, "pretrain_steps": 3,
                  "pretrain_batch": 4, "n_train": 32, "n_eval": 8, "batch": 4, "steps": 4, "smooth": 2,
                  "scan_ranks": [2, 4], "scan_lrs": [1e-3], "scan_seeds": 1, "cells": 1, "rhos": [0.0, 0.05],
                  "n_seeds": 2, "learned_loss": 1e9},
}


# ------------------------------------------------------------------------------------------------- statistics

#: two-sided 95% quantiles of Student's t, df = 1..30
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (table to 30, then a series in 1/df)."""
    if df < 1:
        return math.nan
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_ci(diffs: Sequence[float]) -> Dict[str, Any]:
    """Mean of the paired differences and its 95% t interval (mean ± t_{0.975, n-1} · sd / √n) over the finite
    values; how many were below zero."""
    v = [float(d) for d in diffs if d is not None and math.isfinite(d)]
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None, "sd": None, "below": 0}
    m = sum(v) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": m, "lo": m - half, "hi": m + half, "sd": sd, "below": sum(x < 0 for x in v)}


# ------------------------------------------------------------------------------------------------- base model


def base_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    tok = strings.CharTokenizer()
    return {"task": "strings", "vocab": len(tok), **{k: cfg[k] for k in base.BASE_KEYS if k in cfg and k != "vocab"}}


def _data_fingerprint() -> str:
    """What the pre-training data depend on: the task module's source (its tags, alphabet and generators)."""
    return hashlib.sha256(Path(strings.__file__).read_bytes()).hexdigest()


def pretrain(bcfg: Dict[str, Any], device: torch.device, progress: bool = True):
    """From scratch: AdamW, warm-up + cosine, clipping at 1, loss on the answers of fresh examples every step."""
    from transformers import LlamaForCausalLM

    tok = strings.CharTokenizer()
    pad_id, eos_id = tok.token_to_id(strings.PAD), tok.token_to_id(strings.EOS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(base.llama_config(bcfg, pad_id, eos_id)).to(device)
    steps, bs = bcfg["pretrain_steps"], bcfg["pretrain_batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=bcfg["pretrain_lr"], betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    ex = strings.encode(tok, strings.pretrain_examples(steps * bs, seed=0))
    losses = []
    bar = C.tqdm(range(steps), desc="pre-training the base model", disable=not progress)
    model.train()
    for s in bar:
        loss = model(**task.collate(ex[s * bs:(s + 1) * bs], pad_id, device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    bar.close()
    model.eval()
    k = min(20, len(losses))
    return model, tok, {"final_loss": sum(losses[-k:]) / k, "first_loss": losses[0]}


def load_or_pretrain(cfg: Dict[str, Any], device: torch.device, cache_dir: Optional[str] = None,
                     progress: bool = True):
    from transformers import LlamaForCausalLM

    bcfg = base_config(cfg)
    key = base.cache_key(bcfg, _data_fingerprint())
    path = (Path(cache_dir) if cache_dir else base.default_cache_dir()) / key
    tok = strings.CharTokenizer()
    info_path = path / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        model = LlamaForCausalLM.from_pretrained(str(path)).to(device).eval()
        return model, tok, {**info, "cached": True, "path": str(path)}
    t0 = time.perf_counter()
    model, tok, stats = pretrain(bcfg, device, progress)
    info = {"key": key, "config": bcfg, "pretrain_s": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters()), "device": str(device), **stats}
    info["base_exact_match"] = {t: task.evaluate(model, [_eval_batch(tok, t, 256, device)])[1]
                                for t in strings.PRETRAIN_TAGS + (strings.FINETUNE_TAG,)}
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    info_path.write_text(json.dumps(info, indent=1))
    return model, tok, {**info, "cached": False, "path": str(path)}


def _eval_batch(tok, tag: str, n: int, device):
    _, held = strings.make_splits(0, n, seed=1, tag=tag)
    return task.collate(strings.encode(tok, held), tok.token_to_id(strings.PAD), device)


def prepare_data(tok, cfg: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    pad_id = tok.token_to_id(strings.PAD)
    train, held = strings.make_splits(cfg["n_train"], cfg["n_eval"], seed=0)
    ev = strings.encode(tok, held)
    return {"train": strings.encode(tok, train), "pad_id": pad_id,
            "eval_batches": [task.collate(ev[i:i + 256], pad_id, device) for i in range(0, len(ev), 256)],
            "examples": [p.prompt + p.target for p in train[:2]]}


# ------------------------------------------------------------------------------------------------- one run


def _norm(params) -> float:
    with torch.no_grad():
        return float(torch.sqrt(sum((p.float() ** 2).sum() for p in params)))


def mgpo_eps_norm(opt, rho: float, adaptive_norm: bool, gbar_floor: Optional[float]) -> float:
    """‖ε‖ that MGPO's next training forward applies, after a step: ε = ρ·m/‖m‖/max(ḡ, floor) (ρ·m/‖m‖ without
    APN), so ρ/max(ḡ, floor) or ρ, with ḡ read from the optimizer (0 while m = 0)."""
    if rho == 0.0:
        return 0.0
    if not adaptive_norm:
        return rho
    return rho / max(float(opt.global_state["gbar"]), gbar_floor or 0.0)


def finetune(base_model, data: Dict[str, Any], variant: str, rho: float, rank: int, lr: float, seed: int,
             cfg: Dict[str, Any], device: torch.device,
             eps_schedule: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """One LoRA run.  ``variant`` "mgpo" / "mgpo-noapn": MGPO with that ρ (ρ = 0: AdamW); "noise": AdamW with
    isotropic noise of norm ``eps_schedule[t]`` at step t (MGPO's, recorded by its "mgpo" run).  Returns the
    per-step training loss, the ‖ε‖ applied at each step's forward, held-out loss and exact match at θ."""
    from mgpo_kernels import MGPO

    model = sweep.add_lora(base_model, rank, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    noise = None
    if variant == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight_decay"])
        apn, rho = True, 0.0
    elif variant == "noise":
        if eps_schedule is None:
            raise ValueError("the noise control replays an MGPO run's ‖ε‖: pass eps_schedule")
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight_decay"])
        noise = IsotropicNoise(params, generator=torch.Generator(device).manual_seed(2_000 + seed))
        apn = True
    else:
        apn = VARIANTS[variant]["adaptive_norm"]
        opt = MGPO(params, lr=lr, weight_decay=cfg["weight_decay"], rho=rho, ema_beta=cfg["ema_beta"],
                   adaptive_norm=apn, gbar_floor=cfg["gbar_floor"], backend=cfg.get("mgpo_backend", "auto"))
    steps = cfg["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sweep.lr_lambda(steps, max(1, round(cfg["warmup_frac"] * steps))))
    train = data["train"]
    losses: List[float] = []
    eps: List[float] = []
    next_eps = 0.0  # MGPO's eps is zero before its first step
    diverged = False
    model.train()
    t0 = time.perf_counter()
    for t, idx in enumerate(sweep.batch_order(len(train), steps, cfg["batch"], seed)):
        b = task.collate([train[i] for i in idx], data["pad_id"], device)
        if noise is not None:
            noise.apply(eps_schedule[t] if t < len(eps_schedule) else 0.0)
            eps.append(noise.last_norm)
        else:
            eps.append(next_eps)
        loss = model(**b).loss
        loss.backward()
        if noise is not None:
            noise.remove()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if noise is None and variant != "adamw":
            next_eps = mgpo_eps_norm(opt, rho, apn, cfg["gbar_floor"])
        v = loss.item()
        losses.append(v)
        if not math.isfinite(v):
            diverged = True
            break
    train_s = time.perf_counter() - t0
    if noise is None and variant != "adamw":
        with opt.unperturbed():
            eval_loss, em = task.evaluate(model, data["eval_batches"])
            theta_norm = _norm(params)
    else:
        eval_loss, em = task.evaluate(model, data["eval_batches"])
        theta_norm = _norm(params)
    return {"variant": variant, "rho": rho, "rank": rank, "lr": lr, "seed": seed, "losses": losses, "eps": eps,
            "diverged": diverged, "eval_loss": eval_loss, "exact_match": em, "train_s": train_s,
            "theta_norm_end": theta_norm, "trainable_params": sum(p.numel() for p in params)}


# ------------------------------------------------------------------------------------------------- the phases


def final_loss(losses: List[float], steps: int) -> float:
    if len(losses) < steps or not all(math.isfinite(x) for x in losses):
        return math.nan
    k = max(1, steps // 10)
    return sum(losses[-k:]) / k


def scan_rows(scan: List[Dict[str, Any]], cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per (rank, lr): LoRA's bump, final training loss, held-out loss and exact match over the scan seeds, and
    whether it learned (every seed's final training loss below ``learned_loss``)."""
    rows = []
    for r in cfg["scan_ranks"]:
        for lr in cfg["scan_lrs"]:
            rs = [x for x in scan if x["rank"] == r and x["lr"] == lr]
            if not rs:
                continue
            fin = [final_loss(x["losses"], cfg["steps"]) for x in rs]
            rows.append({"rank": r, "lr": lr, "seeds": len(rs),
                         "bump": metrics.mean_std([metrics.bump(x["losses"], cfg["smooth"]) for x in rs]),
                         "final_train_loss": metrics.mean_std(fin),
                         "eval_loss": metrics.mean_std([x["eval_loss"] for x in rs]),
                         "exact_match": metrics.mean_std([100 * x["exact_match"] for x in rs]),
                         "learned": all(math.isfinite(f) and f < cfg["learned_loss"] for f in fin)})
    return rows


def choose_cells(rows: List[Dict[str, Any]], k: int) -> List[Tuple[int, float]]:
    """The ``k`` (rank, lr) cells where LoRA learned and its mean bump is largest (ties: the earlier row)."""
    ok = [r for r in rows if r["learned"] and r["bump"]["mean"] is not None]
    ok.sort(key=lambda r: -r["bump"]["mean"])
    return [(r["rank"], r["lr"]) for r in ok[:k]]


def dose_plan(cfg: Dict[str, Any], cells) -> List[Tuple[int, float, int, str, float]]:
    """(rank, lr, seed, variant, rho) in run order: per cell and seed, ρ = 0 first, then per ρ MGPO with APN
    before the noise that replays its ‖ε‖."""
    plan = []
    for seed in cfg["seeds"]:
        for rank, lr in cells:
            plan.append((rank, lr, seed, "mgpo", 0.0))
            if "adamw" in cfg["variants"]:
                plan.append((rank, lr, seed, "adamw", 0.0))
            for rho in [x for x in cfg["rhos"] if x > 0]:
                for v in cfg["variants"]:
                    if v != "adamw":
                        plan.append((rank, lr, seed, v, rho))
    return plan


def run_phases(model, data, cfg, device, progress=True, on_run=None, state=None) -> Dict[str, Any]:
    state = state if state is not None else {"scan": [], "runs": []}
    scan_seeds = list(range(cfg["scan_seed0"], cfg["scan_seed0"] + cfg["scan_seeds"]))
    combos = [(s, r, lr) for s in scan_seeds for r in cfg["scan_ranks"] for lr in cfg["scan_lrs"]]
    bar = C.tqdm(combos, desc="scan (LoRA)", disable=not progress, leave=True)
    for seed, rank, lr in bar:
        res = finetune(model, data, "mgpo", 0.0, rank, lr, seed, cfg, device)
        res["variant"] = "lora"
        state["scan"].append(res)
        if on_run:
            on_run(state)
    bar.close()
    state["scan_rows"] = scan_rows(state["scan"], cfg)
    state["cells"] = cells = choose_cells(state["scan_rows"], cfg["cells"])
    if not cells:
        return state
    mgpo_eps: Dict[Tuple, List[float]] = {}
    bar = C.tqdm(dose_plan(cfg, cells), desc="dose-response", disable=not progress, leave=True)
    for rank, lr, seed, v, rho in bar:
        bar.set_postfix_str(f"r={rank} lr={lr:g} seed {seed} {v} rho={rho:g}")
        sched = mgpo_eps.get((rank, lr, seed, rho)) if v == "noise" else None
        res = finetune(model, data, v, rho, rank, lr, seed, cfg, device, eps_schedule=sched)
        if v == "mgpo":
            mgpo_eps[(rank, lr, seed, rho)] = res["eps"]
        state["runs"].append(res)
        if on_run:
            on_run(state)
    bar.close()
    return state


# ------------------------------------------------------------------------------------------------- report


def _metric(run: Dict[str, Any], name: str, cfg: Dict[str, Any]) -> float:
    if name == "bump":
        return metrics.bump(run["losses"], cfg["smooth"])
    return run[name] * (100.0 if name == "exact_match" else 1.0)


def dose_rows(runs: List[Dict[str, Any]], cfg: Dict[str, Any], cells) -> List[Dict[str, Any]]:
    """Per cell (and "all" cells pooled), variant and ρ > 0: the absolute means and the paired differences
    against the ρ = 0 run of the same (cell, seed), with their 95% t intervals."""
    zero = {(x["rank"], x["lr"], x["seed"]): x for x in runs if x["rho"] == 0.0 and x["variant"] == "mgpo"}
    groups = [((r, lr), [(r, lr)]) for r, lr in cells] + ([("all", list(cells))] if len(cells) > 1 else [])
    out = []
    for name, cs in groups:
        z = [x for k, x in zero.items() if (k[0], k[1]) in cs]
        out.append({"cell": name, "variant": "lora", "rho": 0.0, "n": len(z),
                    **{m: metrics.mean_std([_metric(x, m, cfg) for x in z]) for m, _, _ in METRICS},
                    "eps_rel_mean": 0.0, "diverged": sum(x["diverged"] for x in z),
                    "solved": sum(x["exact_match"] >= SOLVED for x in z)})
        for v in cfg["variants"]:
            for rho in ([0.0] if v == "adamw" else [x for x in cfg["rhos"] if x > 0]):
                rs = [x for x in runs if x["variant"] == v and x["rho"] == rho and (x["rank"], x["lr"]) in cs
                      and (x["rank"], x["lr"], x["seed"]) in zero]
                if not rs:
                    continue
                row = {"cell": name, "variant": v, "rho": rho, "n": len(rs),
                       "diverged": sum(x["diverged"] for x in rs),
                       "solved": sum(x["exact_match"] >= SOLVED for x in rs),
                       "eps_rel_mean": metrics.mean_std([
                           (sum(x["eps"]) / max(1, len(x["eps"]))) / x["theta_norm_end"] for x in rs
                           if x["theta_norm_end"]])["mean"]}
                for m, _, _ in METRICS:
                    row[m] = metrics.mean_std([_metric(x, m, cfg) for x in rs])
                    row["d_" + m] = paired_ci([_metric(x, m, cfg) - _metric(zero[(x["rank"], x["lr"], x["seed"])],
                                                                              m, cfg) for x in rs])
                out.append(row)
    return out


def direction_rows(runs: List[Dict[str, Any]], cfg: Dict[str, Any], cells) -> List[Dict[str, Any]]:
    """MGPO (APN) against the noise that replayed its ‖ε‖ (same cell, seed and ρ): does the momentum direction
    matter beyond the size of the move (the paper's Table 4)?  Paired differences MGPO − noise, 95% t intervals."""
    by = {(x["variant"], x["rank"], x["lr"], x["seed"], x["rho"]): x for x in runs}
    groups = [((r, lr), [(r, lr)]) for r, lr in cells] + ([("all", list(cells))] if len(cells) > 1 else [])
    out = []
    for name, cs in groups:
        for rho in [x for x in cfg["rhos"] if x > 0]:
            pairs = [(a, by[("noise",) + k[1:]]) for k, a in by.items()
                     if k[0] == "mgpo" and k[4] == rho and (k[1], k[2]) in cs and ("noise",) + k[1:] in by]
            if pairs:
                out.append({"cell": name, "rho": rho, "n": len(pairs),
                            **{"d_" + m: paired_ci([_metric(a, m, cfg) - _metric(b, m, cfg) for a, b in pairs])
                               for m, _, _ in METRICS}})
    return out


def _ci(d: Dict[str, Any], nd: int) -> Optional[str]:
    if d["mean"] is None:
        return None
    if d["lo"] is None or not math.isfinite(d["lo"]):
        return f"{d['mean']:+.{nd}f}"
    return f"{d['mean']:+.{nd}f} [{d['lo']:+.{nd}f}, {d['hi']:+.{nd}f}]"


def _cell_name(c) -> str:
    return "all cells" if c == "all" else f"r = α = {c[0]}, lr {c[1]:g}"


def markdown(payload: Dict[str, Any]) -> str:
    cfg, b = payload["config"], payload["base"]
    lines = [C.header_md(f"Stability dose-response ({payload['preset']} preset): LoRA-MGPO's ρ on a task LoRA "
                         f"learns", payload)]
    bem = b.get("base_exact_match") or {}
    lines += [
        f"- base: LlamaForCausalLM, hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, "
        f"character vocabulary of {b.get('config', {}).get('vocab')} ({b.get('params', 0) / 1e6:.2f}M parameters), "
        f"pre-trained here for {cfg['pretrain_steps']} steps x {cfg['pretrain_batch']} examples on the string "
        f"operations {', '.join(strings.PRETRAIN_TAGS)} (loss {C.fmt(b.get('first_loss'))} -> "
        f"{C.fmt(b.get('final_loss'), 4)}; pre-training {C.fmt(b.get('pretrain_s'), 0)} s"
        f"{', loaded from cache' if b.get('cached') else ''}); its exact match before fine-tuning: "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in bem.items()),
        f"- task: `{strings.FINETUNE_TAG}` (reverse, then shift every letter +1), words of 4-8 random letters, "
        f"{cfg['n_train']} train / {cfg['n_eval']} held-out words, loss on the answer, exact match of the whole "
        f"answer (teacher-forced argmax = greedy decoding); e.g. `{payload['example']!r}`",
        f"- fine-tuning: LoRA r = α on all linear layers, {cfg['steps']} steps x batch {cfg['batch']}, warm-up "
        f"{cfg['warmup_frac']:.0%} + cosine, AdamW betas (0.9, 0.999), weight decay {cfg['weight_decay']}, "
        f"no clipping; bump = largest rise of the training loss (moving average over {cfg['smooth']} steps) above "
        f"its running minimum",
        f"- MGPO: β (EMA of ‖g‖) {cfg['ema_beta']}, gbar_floor {cfg['gbar_floor']}, direction +momentum, "
        f"backend {', '.join(payload.get('backends', []))}; ρ = 0 is MGPO at ρ = 0 (AdamW); the noise control "
        f"replays, step by step, the ‖ε‖ that MGPO (APN) applied at the same ρ, cell and seed, in an isotropic "
        f"Gaussian direction",
        f"- scan seeds {payload.get('scan_seeds')}; dose-response seeds {cfg['seeds']} (disjoint: the cells are "
        f"chosen on other seeds than they are measured on)",
    ]
    lines += [f"- note: {n}" for n in payload.get("notes", [])]
    lines += [
        "",
        "## 1. Where plain LoRA bumps (scan; mean ± std over the scan seeds)",
        "",
    ]
    head = ["r = α", "lr", "bump", "final train loss", "held-out loss", "exact match %", "learned"]
    body = [[r["rank"], f"{r['lr']:g}", metrics_pm(r["bump"]), metrics_pm(r["final_train_loss"]),
             metrics_pm(r["eval_loss"]), metrics_pm(r["exact_match"], 1), "yes" if r["learned"] else "no"]
            for r in payload.get("scan_rows", [])]
    lines.append(C.md_table(head, body, "rr" + "r" * 5))
    cells = [tuple(c) for c in payload.get("cells", [])]
    lines += [f"Chosen cells (learned, largest mean bump): {', '.join(_cell_name(c) for c in cells) or 'none'}.",
              ""]
    if not cells:
        return "\n".join(lines)
    lines += ["## 2. Dose-response: paired differences against ρ = 0 (same cell, seed, init and batches)", "",
              "Δ = run − its ρ = 0 run; mean [95% CI, t distribution over the seeds]; 'lower' = pairs with "
              "Δ < 0.  Exact match in points.  ‖ε‖/‖θ‖: the run's mean ‖ε‖ over its steps / ‖θ‖ of the "
              "adapters at the end.", ""]
    head = ["cell", "method", "ρ", "n", "bump", "Δ bump", "lower", "held-out loss", "Δ held-out loss", "lower",
            "exact match %", "Δ exact match", f"solved (≥ {SOLVED:.0%})", "‖ε‖/‖θ‖"]
    body = []
    for r in payload["dose_rows"]:
        lab = "LoRA (ρ = 0)" if r["variant"] == "lora" else VARIANTS[r["variant"]]["label"]
        body.append([_cell_name(r["cell"]), lab, f"{r['rho']:g}", r["n"], metrics_pm(r["bump"]),
                     _ci(r["d_bump"], 3) if "d_bump" in r else "", r["d_bump"]["below"] if "d_bump" in r else "",
                     metrics_pm(r["eval_loss"]), _ci(r["d_eval_loss"], 3) if "d_eval_loss" in r else "",
                     r["d_eval_loss"]["below"] if "d_eval_loss" in r else "", metrics_pm(r["exact_match"], 1),
                     _ci(r["d_exact_match"], 1) if "d_exact_match" in r else "",
                     f"{r.get('solved')}/{r['n']}" if r.get("solved") is not None else "",
                     f"{r['eps_rel_mean']:.1e}" if r.get("eps_rel_mean") else ""])
    lines.append(C.md_table(head, body, "ll" + "r" * 12))
    drows = payload.get("direction_rows") or []
    if drows:
        lines += ["", "## 3. Direction: MGPO (APN) against random noise of the same ‖ε‖ at every step", "",
                  "Δ = MGPO − the noise run that replayed its ‖ε‖ (same cell, seed, ρ); mean [95% CI, t], "
                  "(pairs with Δ < 0 / pairs).", ""]
        body = [[_cell_name(r["cell"]), f"{r['rho']:g}", r["n"]]
                + [f"{_ci(r['d_' + m], nd)} ({r['d_' + m]['below']}/{r['d_' + m]['n']})"
                   for m, nd in (("bump", 3), ("eval_loss", 3), ("exact_match", 1))] for r in drows]
        lines.append(C.md_table(["cell", "ρ", "n", "Δ bump", "Δ held-out loss", "Δ exact match (points)"], body,
                                "lrrrrr"))
    return "\n".join(lines)


def metrics_pm(s: Dict[str, Any], nd: int = 3) -> Optional[str]:
    if s["mean"] is None:
        return None
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}"


def charts(payload: Dict[str, Any], path) -> None:
    """``path``: the scan's LoRA loss curves (one panel per rank x lr) and, per chosen cell, the curves at each ρ;
    ``<stem>-<metric>.png``: the paired difference against ρ = 0 with its 95% CI, ρ on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfg = payload["config"]
    path = Path(path)
    ranks, lrs = cfg["scan_ranks"], cfg["scan_lrs"]
    cells = [tuple(c) for c in payload.get("cells", [])]
    ncols = max(len(lrs), len(cells))
    fig, axes = plt.subplots(len(ranks) + (1 if cells else 0), ncols, figsize=(3.4 * ncols, 2.6 * (len(ranks) + 1)),
                             squeeze=False)
    for i, r in enumerate(ranks):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(lrs):
                ax.axis("off")
                continue
            lr = lrs[j]
            for x in payload["scan"]:
                if x["rank"] == r and x["lr"] == lr:
                    ax.plot(metrics.smooth(x["losses"], cfg["smooth"]), lw=1, alpha=0.8)
            mark = " (chosen)" if (r, lr) in cells else ""
            ax.set_title(f"LoRA r = α = {r}, lr {lr:g}{mark}", fontsize=8)
            ax.set_yscale("log")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    if cells:
        cmap = plt.get_cmap("viridis")
        rhos = cfg["rhos"]
        for j in range(ncols):
            ax = axes[len(ranks)][j]
            if j >= len(cells):
                ax.axis("off")
                continue
            rank, lr = cells[j]
            for k, rho in enumerate(rhos):
                cs = [metrics.smooth(x["losses"], cfg["smooth"]) for x in payload["runs"]
                      if x["rank"] == rank and x["lr"] == lr and x["rho"] == rho and x["variant"] == "mgpo"]
                cs = [c for c in cs if len(c) == cfg["steps"]]
                if cs:
                    ax.plot(np.mean(np.array(cs), 0), color=cmap(k / max(1, len(rhos) - 1)), lw=1.1,
                            label=f"ρ = {rho:g}" if rho else "ρ = 0 (LoRA)")
            ax.set_title(f"MGPO (APN), r = α = {rank}, lr {lr:g}: mean over seeds", fontsize=8)
            ax.set_yscale("log")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"{payload['preset']} preset: smoothed training loss ({cfg['smooth']} steps); {payload['device']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    if not cells:
        return
    groups = [c for c in cells] + (["all"] if len(cells) > 1 else [])
    colors = {"mgpo": "tab:red", "mgpo-noapn": "tab:orange", "noise": "tab:gray"}
    rhos = [x for x in cfg["rhos"] if x > 0]
    for m, title, _ in METRICS:
        fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
        for j, g in enumerate(groups):
            ax = axes[0][j]
            for vi, v in enumerate([x for x in cfg["variants"] if x != "adamw"]):
                rows = [r for r in payload["dose_rows"] if r["cell"] == (list(g) if g != "all" else "all")
                        or r["cell"] == g]
                rows = [r for r in rows if r["variant"] == v and r["d_" + m]["mean"] is not None]
                if not rows:
                    continue
                xs = np.array([rhos.index(r["rho"]) for r in rows], dtype=float) + (vi - 1) * 0.12
                mu = np.array([r["d_" + m]["mean"] for r in rows])
                lo = np.array([r["d_" + m]["lo"] if r["d_" + m]["lo"] is not None else np.nan for r in rows])
                hi = np.array([r["d_" + m]["hi"] if r["d_" + m]["hi"] is not None else np.nan for r in rows])
                ax.errorbar(xs, mu, yerr=[mu - lo, hi - mu], fmt="o-", color=colors.get(v), ms=3, lw=1, capsize=2,
                            label=VARIANTS[v]["label"])
            ax.axhline(0, color="k", lw=0.8)
            null = [r for r in payload["dose_rows"] if r["variant"] == "adamw"
                    and (r["cell"] == g or r["cell"] == (list(g) if g != "all" else "all"))]
            if null and null[0]["d_" + m]["lo"] is not None and math.isfinite(null[0]["d_" + m]["lo"]):
                d = null[0]["d_" + m]
                ax.axhspan(d["lo"], d["hi"], color="tab:blue", alpha=0.12, lw=0,
                           label="torch AdamW vs ρ = 0 (rounding only), 95% CI")
                ax.axhline(d["mean"], color="tab:blue", lw=0.8, ls="--")
            ax.set_xticks(range(len(rhos)))
            ax.set_xticklabels([f"{x:g}" for x in rhos], fontsize=7)
            ax.set_xlabel("ρ", fontsize=8)
            ax.set_title(_cell_name(g if g == "all" else tuple(g)), fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"Δ {title} vs ρ = 0", fontsize=8)
                ax.legend(fontsize=6)
        fig.suptitle(f"{payload['preset']} preset: Δ {title} against ρ = 0, mean and 95% t interval over seeds",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(path.with_name(f"{path.stem}-{m.replace('_', '-')}.png"), dpi=100)
        plt.close(fig)


def _complete(state: Dict[str, Any], cfg: Dict[str, Any]) -> List[int]:
    cells = [tuple(c) for c in state.get("cells", [])]
    per_seed = len(dose_plan({**cfg, "seeds": [0]}, cells))
    return [s for s in cfg["seeds"] if sum(x["seed"] == s for x in state.get("runs", [])) == per_seed]


def finish(payload: Dict[str, Any], out_dir, device, name: str, chart: bool) -> Dict[str, Any]:
    cfg = payload["config"]
    note = ""
    cells = [tuple(c) for c in payload.get("cells") or []]
    if "scan_rows" not in payload:
        payload["scan_rows"] = scan_rows(payload["scan"], cfg)
        payload["cells"] = cells = choose_cells(payload["scan_rows"], cfg["cells"])
    keep = _complete(payload, cfg)
    if cells and keep != cfg["seeds"]:
        note = (f"\n**Interrupted**: reported the dose-response seeds that completed every run, {keep} "
                f"(of {cfg['seeds']}).\n")
        payload["interrupted"] = {"seeds_planned": cfg["seeds"], "runs_done": len(payload["runs"])}
        payload["runs"] = [x for x in payload["runs"] if x["seed"] in keep]
        cfg = payload["config"] = {**cfg, "seeds": keep}
    for x in payload["scan"] + payload["runs"]:
        x["losses"] = [round(v, 5) for v in x["losses"]]
        x["eps"] = [float(f"{v:.4g}") for v in x["eps"]]
    payload.setdefault("loadavg_at_end", [round(x, 2) for x in os.getloadavg()])
    payload["dose_rows"] = dose_rows(payload["runs"], cfg, cells) if cells else []
    payload["direction_rows"] = direction_rows(payload["runs"], cfg, cells) if cells else []
    md = markdown(payload) + note + f"\n\nTotal wall time {payload['total_s'] / 60:.1f} min.\n"
    res = C.publish(out_dir, device, name, payload, md, charts if chart else None)
    if chart and cells:
        stem = Path(res["files"]["png"]).stem
        extra = "".join(f"\n![Δ {t}]({stem}-{m.replace('_', '-')}.png)\n" for m, t, _ in METRICS)
        md_path = Path(res["files"]["md"])
        md_path.write_text(md_path.read_text() + extra)
    return res


def run(args, cfg: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    from mgpo_kernels import MGPO

    cfg["seeds"] = list(range(args.seed, args.seed + cfg["n_seeds"]))
    for k, a in (("scan_ranks", "ranks"), ("scan_lrs", "lrs"), ("steps", "steps")):
        if getattr(args, a, None) is not None:
            cfg[k] = getattr(args, a)
    payload: Dict[str, Any] = {
        "benchmark": "stability-dose", "date": C.now_iso(), "command": command_line(), "preset": cfg["preset"],
        "device": str(device), "machine": C.machine_info(device), "versions": C.versions(),
    }
    t0 = time.perf_counter()
    model, tok, binfo = load_or_pretrain(cfg, device, args.cache_dir, not args.no_progress)
    data = prepare_data(tok, cfg, device)
    probe = MGPO([torch.zeros(1, device=device, requires_grad=True)], lr=1e-3, backend=cfg["mgpo_backend"])
    payload.update({"backends": [probe.backend], "config": cfg, "base": binfo, "example": data["examples"][0],
                    "scan_seeds": list(range(cfg["scan_seed0"], cfg["scan_seed0"] + cfg["scan_seeds"]))})
    name = args.name or f"stability-{cfg['preset']}"
    partial = C.results_dir(args.out_dir) / f"{C.result_stem(device, name)}.partial.json"

    def checkpoint(state):
        payload.update(scan=state["scan"], runs=state["runs"], total_s=time.perf_counter() - t0)
        if "cells" in state:
            payload["cells"] = state["cells"]
        partial.write_text(json.dumps(payload, default=C._json_default))

    state = run_phases(model, data, cfg, device, not args.no_progress, on_run=checkpoint)
    payload.update(scan=state["scan"], runs=state["runs"], cells=state.get("cells", []),
                   scan_rows=state.get("scan_rows"), total_s=time.perf_counter() - t0)
    res = finish(payload, args.out_dir, device, name, not args.no_chart)
    partial.unlink(missing_ok=True)
    return res

