"""The training curve of a run: its points (train loss, eval loss, learning rate per step) and a PNG of them.

The PNG is saved in the run folder (``loss_curve.png``, next to train_result.json, outside the adapter's manifest),
so it travels with the run to the artifact root, and the train stage's artifacts link to it.
"""
from __future__ import annotations

from pathlib import Path

from . import _store
from .contracts import TrainResult

LOSS_CURVE_PNG = "loss_curve.png"


def curve_points(result: TrainResult) -> list[dict]:
    """One row per logged step: step, loss, eval_loss, learning_rate (None where that step did not log it)."""
    by_step: dict[int, dict] = {}
    for h in result.log_history:
        if "step" not in h or not any(k in h for k in ("loss", "eval_loss", "learning_rate")):
            continue
        row = by_step.setdefault(int(h["step"]), {"step": int(h["step"]), "loss": None, "eval_loss": None, "learning_rate": None})
        for k in ("loss", "eval_loss", "learning_rate"):
            if k in h and h[k] is not None:
                row[k] = float(h[k])
    return [by_step[s] for s in sorted(by_step)]


def plot(result: TrainResult, path: Path, title: str) -> Path:
    """Train and eval loss (left axis) and the learning rate (right axis) against the optimizer step; written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")   # no display on a worker
    import matplotlib.pyplot as plt

    pts = curve_points(result)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    try:
        for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o--")):
            xs = [p["step"] for p in pts if p[key] is not None]
            if xs:
                ax.plot(xs, [p[key] for p in pts if p[key] is not None], style, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        lr = [(p["step"], p["learning_rate"]) for p in pts if p["learning_rate"] is not None]
        if lr:
            ax2 = ax.twinx()
            ax2.plot([s for s, _ in lr], [v for _, v in lr], color="tab:gray", alpha=0.6, label="learning rate")
            ax2.set_ylabel("learning rate")
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
            ax.legend(handles=handles, loc="upper right", fontsize=8)
        elif pts:
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    _store.atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
