"""Training-curve picture (losses and AP over iterations) from Detectron2's metrics.json."""
import json
from typing import Dict, List

from ..utils.files import atomic_open

__all__ = ["read_metrics", "plot_training_curve"]

_AP_KEYS = ("bbox/AP", "segm/AP", "bbox/AP50", "segm/AP50")


def read_metrics(path: str) -> List[Dict]:
    """
    Read metrics.json (one JSON object per line, as Detectron2's ``JSONWriter`` appends).

    A resumed run appends again from its checkpoint's iteration, so an iteration may appear in
    several lines; for each iteration the keys of later lines win (they belong to the run
    that continued). Unparsable lines (a run killed mid-write) are ignored.

    Returns:
        list[dict]: one dict per iteration, sorted by "iteration".
    """
    by_iter: Dict[int, Dict] = {}
    with open(path) as f:
        lines = f.readlines()
    # A resumed run starts at a lower iteration than the killed run reached: drop the killed
    # run's lines from that point on, so curves show one consistent history.
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "iteration" in entry:
            entries.append(entry)
    for entry in entries:
        it = int(entry["iteration"])
        for later in [k for k in by_iter if k > it and "total_loss" in entry]:
            del by_iter[later]
        by_iter.setdefault(it, {}).update(entry)
    return [by_iter[k] for k in sorted(by_iter)]


def plot_training_curve(metrics_path: str, out_path: str) -> str:
    """
    Draw losses (left) and COCO AP (right) against iteration into a PNG.

    Args:
        metrics_path (str): Detectron2's metrics.json.
        out_path (str): the PNG to write.

    Returns:
        str: ``out_path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; never opens a window
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    loss_keys = sorted({k for r in rows for k in r if k.startswith("loss_")})
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in ["total_loss"] + loss_keys:
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax_loss.plot(xs, ys, label=key, linewidth=2.0 if key == "total_loss" else 1.0)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss (median of the writer window)")
    ax_loss.set_yscale("log")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(fontsize=7)
    ax_loss.set_title("training losses")
    drew_ap = False
    for key in _AP_KEYS:
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax_ap.plot(xs, ys, marker="o", label=key)
            drew_ap = True
    ax_ap.set_xlabel("iteration")
    ax_ap.set_ylabel("COCO AP (%)")
    ax_ap.set_ylim(0, 100)
    ax_ap.grid(True, alpha=0.3)
    ax_ap.set_title("held-out AP")
    if drew_ap:
        ax_ap.legend(fontsize=8)
    else:
        ax_ap.text(0.5, 0.5, "no evaluation yet", ha="center", va="center",
                   transform=ax_ap.transAxes)
    last = max((r["iteration"] for r in rows), default=0)
    for ax in (ax_loss, ax_ap):  # one iteration scale for both panels
        ax.set_xlim(0, max(last, 1) * 1.03)
    fig.tight_layout()
    # Atomic: a run killed while drawing never leaves a truncated PNG.
    with atomic_open(out_path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return out_path
