"""The sweep's table (mean ± std over seeds), the markdown around it and the Figure-2-like grid of loss curves."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from mgpo_kernels.bench import common as C
from . import metrics
from .sweep import METHODS


def final_loss(losses: List[float], steps: int) -> float:
    """Mean raw training loss over the last tenth of the run (nan for a run that stopped early)."""
    if len(losses) < steps or not all(math.isfinite(x) for x in losses):
        return math.nan
    k = max(1, steps // 10)
    return sum(losses[-k:]) / k


def aggregate(runs: List[Dict[str, Any]], cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per (rank, lr, method), in sweep order, with mean/std over the seeds that ran."""
    rows = []
    for r in cfg["ranks"]:
        for lr in cfg["lrs"]:
            for m in cfg["methods"]:
                rs = [x for x in runs if x["rank"] == r and x["lr"] == lr and x["method"] == m]
                if not rs:
                    continue
                bumps = [metrics.bump(x["losses"], cfg["smooth"]) for x in rs]
                rows.append({
                    "rank": r, "lr": lr, "method": m, "seeds": len(rs),
                    "diverged": sum(x["diverged"] for x in rs),
                    "bump": metrics.mean_std(bumps),
                    "final_train_loss": metrics.mean_std([final_loss(x["losses"], cfg["steps"]) for x in rs]),
                    "eval_loss": metrics.mean_std([x["eval_loss"] for x in rs]),
                    "exact_match": metrics.mean_std([100 * x["exact_match"] for x in rs]),
                    "train_s": metrics.mean_std([x["train_s"] for x in rs]),
                    "eps_rel": metrics.mean_std([x["eps_norm_end"] / x["theta_norm_end"] for x in rs
                                                 if x.get("eps_norm_end") is not None and x.get("theta_norm_end")]),
                })
    return rows


def _pm(s: Dict[str, Optional[float]], nd: int = 3) -> Optional[str]:
    if s["mean"] is None:
        return None
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}"


def table_md(rows: List[Dict[str, Any]]) -> str:
    head = ["r = α", "lr", "method", "bump", "final train loss", "held-out loss (θ)", "exact match %",
            "diverged", "train s/run", "‖ε‖/‖θ‖ at end"]
    body = [[r["rank"], f"{r['lr']:g}", METHODS[r["method"]]["label"], _pm(r["bump"]), _pm(r["final_train_loss"]),
             _pm(r["eval_loss"]), _pm(r["exact_match"], 1), f"{r['diverged']}/{r['seeds']}",
             C.fmt(r["train_s"]["mean"], 1), _sci(r.get("eps_rel"))] for r in rows]
    return C.md_table(head, body, "rrl" + "r" * 7)


def _sci(s: Optional[Dict[str, Optional[float]]]) -> Optional[str]:
    return None if not s or s["mean"] is None else f"{s['mean']:.1e}"


def summary_md(rows: List[Dict[str, Any]], methods: List[str]) -> str:
    """Compact pivot: one line per (rank, lr), per method 'bump / exact match %' (means over seeds)."""
    keys = []
    for r in rows:
        if (r["rank"], r["lr"]) not in keys:
            keys.append((r["rank"], r["lr"]))
    body = []
    for rank, lr in keys:
        line: List[Any] = [rank, f"{lr:g}"]
        for m in methods:
            x = next((r for r in rows if r["rank"] == rank and r["lr"] == lr and r["method"] == m), None)
            if x is None or x["bump"]["mean"] is None:
                line.append("diverged" if x is not None and x["diverged"] else None)
            else:
                dv = f" ({x['diverged']} div.)" if x["diverged"] else ""
                line.append(f"{x['bump']['mean']:.3f} / {x['exact_match']['mean']:.1f}{dv}")
        body.append(line)
    return C.md_table(["r = α", "lr"] + [METHODS[m]["label"] for m in methods], body, "rr" + "r" * len(methods))


def paired(runs: List[Dict[str, Any]], cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each method against LoRA on the same (rank, lr, seed), i.e. the same initialisation and batches: in how
    many pairs its bump / held-out loss is lower, and the mean differences (method − LoRA)."""
    by = {(x["method"], x["rank"], x["lr"], x["seed"]): x for x in runs}
    out = []
    for m in cfg["methods"]:
        if m == "lora":
            continue
        pairs = [(by[("lora",) + k[1:]], x) for k, x in by.items() if k[0] == m and ("lora",) + k[1:] in by]
        if not pairs:
            continue
        db = [metrics.bump(b["losses"], cfg["smooth"]) - metrics.bump(a["losses"], cfg["smooth"]) for a, b in pairs]
        de = [b["eval_loss"] - a["eval_loss"] for a, b in pairs]
        dm = [100 * (b["exact_match"] - a["exact_match"]) for a, b in pairs]
        out.append({"method": m, "pairs": len(pairs), "lower_bump": sum(d < 0 for d in db),
                    "lower_eval_loss": sum(d < 0 for d in de), "d_bump": metrics.mean_std(db),
                    "d_eval_loss": metrics.mean_std(de), "d_exact_match": metrics.mean_std(dm)})
    return out


def paired_md(rows: List[Dict[str, Any]]) -> str:
    head = ["method", "pairs", "lower bump than LoRA", "lower held-out loss", "Δ bump", "Δ held-out loss",
            "Δ exact match (points)"]
    body = [[METHODS[r["method"]]["label"], r["pairs"], r["lower_bump"], r["lower_eval_loss"], _pm(r["d_bump"]),
             _pm(r["d_eval_loss"]), _pm(r["d_exact_match"], 2)] for r in rows]
    return C.md_table(head, body, "l" + "r" * 6)


def markdown(payload: Dict[str, Any]) -> str:
    cfg, b = payload["config"], payload["base"]
    mgpo_opts = payload["mgpo_options"]
    made = f"pre-training took {C.fmt(b.get('pretrain_s'), 0)} s" + (", loaded from cache" if b.get("cached") else "")
    lines = [C.header_md(f"Stability sweep ({payload['preset']} preset): LoRA vs LoRA-MGPO", payload)]
    lines += [
        f"- base model: LlamaForCausalLM, hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, "
        f"vocab {cfg['vocab']} ({b.get('params', 0) / 1e6:.2f}M parameters), pre-trained here for "
        f"{cfg['pretrain_steps']} steps x {cfg['pretrain_batch']} x {cfg['seq']} tokens on {b.get('tokens')} tokens "
        f"of Python's docs + stdlib source (loss {C.fmt(b.get('first_loss'))} -> {C.fmt(b.get('final_loss'))}; "
        f"{made})",
        f"- task: generated arithmetic word problems, {cfg['n_train']} train / {cfg['n_eval']} held-out, loss on "
        f"the answer tokens, exact match = greedy answer equals the reference (teacher-forced argmax); e.g. "
        f"`{payload['example']!r}`",
        f"- fine-tuning: LoRA r = α on all linear layers, {cfg['steps']} steps x batch {cfg['batch']}, "
        f"warm-up {cfg['warmup_frac']:.0%} + cosine, no clipping, AdamW betas (0.9, 0.999), weight decay "
        f"{cfg['weight_decay']} for every method; seeds {cfg['seeds']} (same LoRA init and batch order for every "
        f"method of a seed)",
        f"- MGPO: {mgpo_opts}; random noise: isotropic Gaussian direction scaled to MGPO's ‖ε‖ = ρ/ḡ",
        f"- bump = largest rise of the training loss (moving average over {cfg['smooth']} steps) above its running "
        f"minimum; mean ± std over seeds",
        "",
        "## Summary: bump / exact match % (means over seeds)",
        "",
        summary_md(payload["rows"], cfg["methods"]),
        "## Paired with LoRA (same rank, lr and seed; over the whole grid; Δ = method − LoRA, mean ± std)",
        "",
        paired_md(paired(payload["runs"], cfg)),
        "## All runs (mean ± std over seeds)",
        "",
        table_md(payload["rows"]),
    ]
    return "\n".join(lines)


def chart(payload: Dict[str, Any], path) -> None:
    """Grid like the paper's Figure 2: one panel per (rank, lr), each method's smoothed training loss, mean over
    seeds with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfg, runs = payload["config"], payload["runs"]
    ranks, lrs = cfg["ranks"], cfg["lrs"]
    size = (max(8.0, 3.6 * len(lrs)), 2.8 * len(ranks) + 0.6)
    fig, axes = plt.subplots(len(ranks), len(lrs), figsize=size, squeeze=False, sharex=True)
    colors = dict(zip(METHODS, ["tab:blue", "tab:red", "tab:orange", "tab:gray", "tab:green"]))
    for i, r in enumerate(ranks):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            lo_all, hi_all = [], []
            for m in cfg["methods"]:
                curves = [metrics.smooth(x["losses"], cfg["smooth"]) for x in runs
                          if x["rank"] == r and x["lr"] == lr and x["method"] == m]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                a = np.array([c[:n] for c in curves], dtype=float)
                mu, sd = a.mean(0), a.std(0)
                x = np.arange(1, n + 1)
                ax.plot(x, mu, color=colors[m], lw=1.2, label=METHODS[m]["label"])
                ax.fill_between(x, mu - sd, mu + sd, color=colors[m], alpha=0.2, lw=0)
                fin = mu[np.isfinite(mu)]
                if fin.size:
                    start = fin[: max(1, n // 20)].max()
                    lo_all.append(fin.min())
                    hi_all.append(max(start, min(fin.max(), start + 0.5 * (start - fin.min()))))
            if lo_all:
                lo, hi = min(lo_all), max(hi_all)
                ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
            ax.set_title(f"r = α = {r}, lr {lr:g}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == len(ranks) - 1:
                ax.set_xlabel("step", fontsize=8)
            if j == 0:
                ax.set_ylabel("train loss (smoothed)", fontsize=8)
    h, l = axes[0][0].get_legend_handles_labels()
    fig.legend(h, l, loc="upper center", ncol=min(len(l), 5), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.965))
    fig.suptitle(f"LoRA fine-tuning on arithmetic word problems, {payload['preset']} preset, "
                 f"{len(cfg['seeds'])} seeds (mean ± std); {payload['device']}", fontsize=9, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
