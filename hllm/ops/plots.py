"""PNG figures for MLflow runs: the training loss curve and Recall@K / NDCG@K bars against baselines.

matplotlib runs headless (Agg) and is imported inside each function: the CLI never pays for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def loss_curve(
    series: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, title: str = "training loss"
) -> Path:
    """One line per series of (step, value) points, e.g. ``{"train/loss": [(0, 5.1), (10, 4.2)]}``."""
    if not any(series.values()):
        raise ValueError("loss_curve: no points to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for name, pts in series.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def metric_bars(
    results: Mapping[str, Mapping[str, float]], ks: Sequence[int], path: str | Path, title: str = "test metrics"
) -> Path:
    """Grouped bars, one panel per metric family (Recall@K, NDCG@K), one bar per model and K.

    ``results``: model label -> {"recall@10": 0.12, "ndcg@10": 0.07, ...} as fractions; drawn in %.
    """
    if not results:
        raise ValueError("metric_bars: no results to plot")
    plt = _pyplot()
    families = ("recall", "ndcg")
    labels = list(results)
    width = 0.8 / max(len(labels), 1)
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), dpi=100)
    try:
        for ax, fam in zip(axes, families):
            for j, label in enumerate(labels):
                vals = [100.0 * results[label].get(f"{fam}@{k}", float("nan")) for k in ks]
                xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(ks))]
                bars = ax.bar(xs, vals, width=width, label=label)
                ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
            ax.set_xticks(range(len(ks)), [f"@{k}" for k in ks])
            ax.set_ylabel(f"{'Recall' if fam == 'recall' else 'NDCG'} (%)")
            ax.set_title(f"{'Recall' if fam == 'recall' else 'NDCG'}@K")
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend()
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
