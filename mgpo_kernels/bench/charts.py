"""The charts' shared parts: a headless pyplot, one horizontal bar per row and rank set beside the ratio 1, and
the saved figure; matplotlib is imported only when a chart is drawn (``--no-chart`` runs without it)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ratio_bars(ax, per_rank: Sequence[Dict[str, Any]], keys: List[str], names: Dict[str, str], field: str,
               fontsize: int, value_labels: bool = False):
    """Bars of ``row[field]`` for every row key (one bar per rank, grouped), labelled by ``names``, with the
    line at 1 (the reference row); ``value_labels`` writes each value beside its bar."""
    width = 0.8 / max(1, len(per_rank))
    for j, res in enumerate(per_rank):
        vals = {r["key"]: r.get(field, float("nan")) for r in res["rows"]}
        ys = [vals.get(k, float("nan")) for k in keys]
        bars = ax.barh([i + j * width for i in range(len(keys))], ys, height=width, label=f"r={res['rank']}")
        if value_labels:
            for b, y in zip(bars, ys):
                if y == y:
                    ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {y:.3f}", va="center", fontsize=7)
    ax.set_yticks([i + width * (len(per_rank) - 1) / 2 for i in range(len(keys))])
    ax.set_yticklabels([names[k] for k in keys], fontsize=fontsize)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()


def save(fig, plt, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
