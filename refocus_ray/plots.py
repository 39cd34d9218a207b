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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_k(results: list[dict], out_png: str | Path) -> Path:
    """Accuracy of the answering model(s) against K, one line per method (family `all`)."""
    plt = _pyplot()
    rows = [r for r in results if r["family"] == "all"]
    models = sorted({r["model"] for r in rows}, key=lambda m: (m != "reference", m))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in methods:
            pts = sorted((r["k"], r["accuracy"]) for r in rows
                         if r["model"] == model and r["method"] == method)
            style = "-" if method.startswith("refocus") else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=method)
        ks = sorted({r["k"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (frames given to the model)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"accuracy vs K ({model})")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def contact_sheet(out_png: str | Path, title: str, duration_s: float,
                  evidence: list[dict], distractors: list[dict],
                  methods: list[tuple[str, list[float], list]]) -> Path:
    """Per method: the video's timeline with evidence (green) and distractor (red) segments and
    the chosen frames as ticks, then the chosen frames themselves (uint8 thumbnails, time order).
    Shows at a glance whether a selector found the evidence or was drawn to the distractors."""
    import numpy as np

    plt = _pyplot()
    n = len(methods)
    k = max((len(m[1]) for m in methods), default=1)
    height = 1.45 * n + 0.6
    fig = plt.figure(figsize=(max(8.0, 1.0 * k + 1.5), height))
    gs = fig.add_gridspec(2 * n, 1, height_ratios=[0.28, 1.0] * n, hspace=0.08,
                          top=1 - 0.45 / height, bottom=0.02)
    for i, (name, times, thumbs) in enumerate(methods):
        tl = fig.add_subplot(gs[2 * i])
        for spans, color in ((evidence, "tab:green"), (distractors, "tab:red")):
            for s in spans:
                tl.axvspan(s["start_s"], s["end_s"], color=color, alpha=0.55, lw=0)
        tl.vlines(times, 0, 1, color="black", lw=1.2)
        tl.set_xlim(0, duration_s)
        tl.set_ylim(0, 1)
        tl.set_yticks([])
        tl.tick_params(axis="x", labelsize=6, length=2, pad=1)
        tl.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        im = fig.add_subplot(gs[2 * i + 1])
        im.axis("off")
        if len(thumbs):
            h = max(t.shape[0] for t in thumbs)
            pad = [np.pad(t, ((0, h - t.shape[0]), (0, 2), (0, 0)), constant_values=255)
                   for t in thumbs]
            im.imshow(np.concatenate(pad, axis=1), aspect="equal")
    fig.suptitle(title, fontsize=9)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(out_png)


def recall_by_position(hits: dict[str, list[tuple[float, float]]], out_png: str | Path,
                       title: str, bins: int = 5) -> Path:
    """Evidence recall against the evidence segment's position in the video (needle position),
    one line per method. `hits[method]` = (position in [0, 1], hit rate of that segment)."""
    import numpy as np

    plt = _pyplot()
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, pts in hits.items():
        if not pts:
            continue
        pos, hit = np.array(pts, np.float64).T
        b = np.clip(np.digitize(pos, edges[1:-1]), 0, bins - 1)
        ys = [hit[b == i].mean() if (b == i).any() else np.nan for i in range(bins)]
        ax.plot(centres * 100, ys, marker="o", label=method,
                ls="-" if method.startswith("refocus") else "--")
    ax.set_xlabel("evidence position in the video (% of duration)")
    ax.set_ylabel("evidence recall")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def recall_heatmap(hits: dict[str, list[tuple[float, float, float]]], out_png: str | Path,
                   title: str, pos_bins: int = 5, len_bins: int = 4) -> Path:
    """The paper's NIAH-style figure: evidence recall by needle position (x) and video length
    (y, quantile bins), one panel per method. `hits[method]` = (position, length_s, hit)."""
    import numpy as np

    plt = _pyplot()
    methods = [m for m, pts in hits.items() if pts]
    lengths = np.array([p[1] for m in methods for p in hits[m]], np.float64)
    len_edges = np.unique(np.quantile(lengths, np.linspace(0, 1, len_bins + 1))) \
        if len(lengths) else np.array([0.0, 1.0])
    if len(len_edges) < 2:
        len_edges = np.array([len_edges[0], len_edges[0] + 1e-6])
    pos_edges = np.linspace(0, 1, pos_bins + 1)
    nl = len(len_edges) - 1
    ncols = min(max(len(methods), 1), 5)
    nrows = -(-max(len(methods), 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.8 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel()[len(methods):]:
        ax.axis("off")
    for ax, method in zip(axes.ravel(), methods):
        pos, length, hit = np.array(hits[method], np.float64).T
        bp = np.clip(np.digitize(pos, pos_edges[1:-1]), 0, pos_bins - 1)
        bl = np.clip(np.digitize(length, len_edges[1:-1]), 0, nl - 1)
        grid = np.full((nl, pos_bins), np.nan)
        for i in range(nl):
            for j in range(pos_bins):
                m = (bl == i) & (bp == j)
                if m.any():
                    grid[i, j] = hit[m].mean()
        img = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", origin="lower", aspect="auto")
        ax.set_title(method, fontsize=8)
        ax.set_xticks(range(pos_bins), [f"{int(100 * c)}" for c in pos_edges[:-1]], fontsize=6)
        first_col = ax.get_subplotspec().is_first_col()
        ax.set_yticks(range(nl), [f"{len_edges[i]:.0f}-{len_edges[i + 1]:.0f}s"
                                  for i in range(nl)] if first_col else [], fontsize=6)
    fig.supxlabel("needle position (% of the video, bin start)", fontsize=8)
    fig.supylabel("video length", fontsize=8)
    if methods:
        fig.colorbar(img, ax=axes.ravel().tolist(), shrink=0.8, label="evidence recall")
    fig.suptitle(title, fontsize=9)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(out_png)


def variance_histogram(variances, families: list[str], threshold: float,
                       out_png: str | Path) -> Path:
    """The reward-variance filter's histogram: variance of each question's 16 margins, stacked
    by question family, the threshold marked; the legend gives each family's kept fraction."""
    import numpy as np

    plt = _pyplot()
    var = np.asarray(variances, np.float64)
    fam = np.asarray(families, dtype=object)
    names = sorted(set(families))
    top = max(float(var.max()) if len(var) else 0.0, threshold) * 1.05 or 1.0
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([var[fam == n] for n in names] or [[]], bins=np.linspace(0, top, 41), stacked=True,
            label=[f"{n} ({(var[fam == n] > threshold).mean():.0%} kept, n={(fam == n).sum()})"
                   for n in names] or None)
    ax.axvline(threshold, color="black", ls="--", lw=1.2)
    ax.annotate(f" threshold {threshold:g}: {(var > threshold).mean() if len(var) else 0:.0%} "
                f"of {len(var)} kept", (threshold, ax.get_ylim()[1]), va="top", fontsize=8)
    ax.set_xlabel("variance of the reward margin over 8 windows + 8 complements")
    ax.set_ylabel("questions")
    ax.set_title("reward-variance filter", fontsize=9)
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
