"""The learning-curve picture written into each run directory."""

from __future__ import annotations

from pathlib import Path


def write_curve(records: list[dict], path: Path, title: str = "") -> bool:
    if not records:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, xkey, xlabel in ((axes[0], "time_s", "wall-clock seconds"), (axes[1], "env_steps", "environment steps")):
        tr = [(r[xkey], r["mean_return"]) for r in records if r.get("mean_return") is not None]
        ev = [(r[xkey], r["eval_return"]) for r in records if r.get("eval_return") is not None]
        if tr:
            ax.plot(*zip(*tr), label="training return (last 100 episodes)", color="tab:blue", alpha=0.7)
        if ev:
            ax.plot(*zip(*ev), "o-", label="greedy evaluation mean", color="tab:red", markersize=3)
        ax.axhline(-110, color="grey", linestyle="--", linewidth=1, label="MountainCar solved (-110)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("episode return")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
