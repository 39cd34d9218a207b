"""Figures written into run directories (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def training_curve(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Mean reward, accuracy (r > 0), policy entropy and K per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line]
    it = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, title in [
        (axes[0], ("reward_mean",), "mean reward (tanh margin)"),
        (axes[1], ("accuracy",), "accuracy of the reference (r > 0)"),
        (axes[2], ("entropy",), "policy entropy per step (nats)"),
    ]:
        for key in keys:
            ax.plot(it, [r.get(key) for r in rows], label=key)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    ks = [r.get("k") for r in rows]
    for i in range(1, len(ks)):
        if ks[i] != ks[i - 1]:
            for ax in axes:
                ax.axvline(it[i], color="grey", ls=":", lw=1)
            axes[0].annotate(f"K={ks[i]}", (it[i], axes[0].get_ylim()[1]), fontsize=8,
                             va="top")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
