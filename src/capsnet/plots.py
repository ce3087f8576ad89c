"""PNG figures of the experiments (matplotlib, Agg backend, atomic writes).

Every function takes plain data (lists, dicts, tensors / arrays), writes one PNG to ``path``
(temp file + rename, parent folders created) and returns the path. No function shows a
window or depends on global pyplot state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from capsnet.io import atomic_path  # noqa: E402

__all__ = [
    "save_figure",
    "plot_lines",
    "plot_xy",
    "plot_attack_curves",
    "plot_image_grid",
    "plot_reconstructions",
    "plot_pose_perturbation",
    "plot_routing_histograms",
    "plot_couplings",
    "plot_bars",
    "plot_training_curves",
]

_DPI = 110


def save_figure(fig: Figure, path: str | os.PathLike, *, tight: bool = True) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and close it.

    ``tight=False`` skips the bounding-box pass (one draw instead of two) for figures that
    lay themselves out.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    return path


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def plot_lines(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    shade: tuple[float, float] | None = None,
    shade_label: str = "training range",
    ylim: tuple[float, float] | None = None,
    styles: Mapping[str, str] | None = None,
    logy: bool = False,
    legend_outside: bool = False,
) -> Path:
    """Several y-series against one x axis (e.g. accuracy vs rotation angle per model).

    Args:
        x: the shared x values.
        series: ``{label: y values}``, each as long as ``x``.
        path: PNG file to write.
        xlabel, ylabel, title: axis labels and title.
        shade: an x interval to shade (e.g. the training range of an augmentation).
        shade_label: legend entry of the shaded interval.
        ylim: y-axis limits.
        styles: optional matplotlib format string per label (e.g. ``"--"``).
        logy: logarithmic y axis.
        legend_outside: put the legend right of the axes (many series).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if shade is not None:
        ax.axvspan(shade[0], shade[1], color="0.9", label=shade_label)
    for label, y in series.items():
        if len(y) != len(x):
            raise ValueError(f"series {label!r} has {len(y)} values for {len(x)} x values")
        fmt = (styles or {}).get(label, "-")
        ax.plot(list(x), list(y), fmt, marker="o", markersize=3.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if legend_outside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_xy(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    highlight: Mapping[str, int] | None = None,
    vline: float | None = None,
) -> Path:
    """Curves with their own x values (e.g. novel vs familiar error, one point per epoch).

    Args:
        series: ``{label: (xs, ys)}``.
        path: PNG file to write.
        xlabel, ylabel, title: labels.
        highlight: ``{label: index}`` of a point to circle on each curve.
        vline: draw a dashed vertical line at this x.
    """
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    for k, (label, (xs, ys)) in enumerate(series.items()):
        if len(xs) != len(ys):
            raise ValueError(f"series {label!r}: {len(xs)} x values but {len(ys)} y values")
        color = f"C{k % 10}"
        ax.plot(list(xs), list(ys), "-o", color=color, markersize=3.5, label=label)
        if highlight and label in highlight:
            i = highlight[label]
            ax.plot([xs[i]], [ys[i]], "o", color=color, markersize=11, fillstyle="none")
    if vline is not None:
        ax.axvline(vline, color="0.5", linestyle="--", linewidth=1, label="matched level")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_attack_curves(
    results: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Accuracy (untargeted) / success rate (targeted) vs epsilon, one panel per attack.

    Args:
        results: ``{model label: [attack result dicts from
            capsnet.attacks.evaluate_attack]}``; one panel per distinct
            (method, targeted) pair, one line per model, shaded by its
            ``accuracy_interval`` / ``success_interval`` when present.
        path: PNG file to write.
        title: figure title.
    """
    panels: list[tuple[str, bool]] = []
    for runs in results.values():
        for r in runs:
            key = (r["method"], bool(r["targeted"]))
            if key not in panels:
                panels.append(key)
    if not panels:
        raise ValueError("results hold no attack runs")
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (method, targeted) in zip(axes.flat, panels, strict=False):
        for label, runs in results.items():
            for r in runs:
                if r["method"] == method and bool(r["targeted"]) == targeted:
                    y = r["success_rate"] if targeted else r["accuracy"]
                    (line,) = ax.plot(r["epsilons"], y, marker="o", markersize=3.5, label=label)
                    band = r.get("success_interval" if targeted else "accuracy_interval")
                    if band:  # 95 % bootstrap interval over the test images
                        low, high = zip(*band, strict=True)
                        ax.fill_between(
                            r["epsilons"], low, high, color=line.get_color(), alpha=0.2, lw=0
                        )
        kind = "targeted" if targeted else "untargeted"
        sweep = sorted({e for runs in results.values() for r in runs for e in r["epsilons"]})
        if len(sweep) <= 10:  # one tick per epsilon of the sweep, written as given
            ax.set_xticks(sweep, [f"{e:g}" for e in sweep])
        ax.set_title(f"{method.upper()}, {kind}")
        ax.set_xlabel("epsilon (L-inf, pixel units)")
        ax.set_ylabel("target success rate" if targeted else "accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_image_grid(
    images: Any,
    path: str | os.PathLike,
    *,
    title: str = "",
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cell_inches: float = 0.7,
) -> Path:
    """A grid of images in [0, 1], drawn as one mosaic with 1-pixel gaps.

    Args:
        images: ``(rows, cols, C, H, W)`` array or tensor (C = 1 or 3).
        path: PNG file to write.
        title: figure title.
        row_labels, col_labels: optional labels down the left / along the top.
        cell_inches: size of one cell.
    """
    grid = _to_numpy(images)
    if grid.ndim != 5 or grid.shape[2] not in (1, 3):
        raise ValueError(
            f"images must have shape (rows, cols, C in {{1, 3}}, H, W), got {grid.shape}"
        )
    rows, cols, channels, h, w = grid.shape
    gap = 1
    mosaic = np.ones(((h + gap) * rows - gap, (w + gap) * cols - gap, channels), np.float32)
    for r in range(rows):
        for c in range(cols):
            cell = np.transpose(np.clip(grid[r, c], 0.0, 1.0), (1, 2, 0))
            mosaic[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = cell
    fig, ax = plt.subplots(figsize=(cols * cell_inches + 1.0, rows * cell_inches + 0.6))
    shown = mosaic[..., 0] if channels == 1 else mosaic
    ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([c * (w + gap) + w / 2 - 0.5 for c in range(cols)] if col_labels else [])
    ax.set_yticks([r * (h + gap) + h / 2 - 0.5 for r in range(rows)] if row_labels else [])
    if col_labels:
        ax.set_xticklabels(col_labels, fontsize=7)
        ax.xaxis.tick_top()
    if row_labels:
        ax.set_yticklabels(row_labels, fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9, pad=14 if col_labels else 6)
    return save_figure(fig, path)


def plot_reconstructions(
    inputs: Any, reconstructions: Any, path: str | os.PathLike, *, per_row: int = 10
) -> Path:
    """Inputs above their reconstructions ([S17] Fig. 3 style), ``per_row`` pairs a row.

    Shape:
        - inputs, reconstructions: ``(N, C, H, W)`` in [0, 1].
    """
    x, y = _to_numpy(inputs), _to_numpy(reconstructions)
    if x.shape != y.shape:
        raise ValueError(f"inputs {x.shape} and reconstructions {y.shape} differ in shape")
    n = x.shape[0]
    blocks = math.ceil(n / per_row)
    pad = blocks * per_row - n
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
    rows = []
    labels = []
    for b in range(blocks):
        rows += [x[b * per_row : (b + 1) * per_row], y[b * per_row : (b + 1) * per_row]]
        labels += ["input", "recon."]
    return plot_image_grid(
        np.stack(rows), path, title="Inputs and reconstructions", row_labels=labels
    )


def plot_pose_perturbation(
    grid: Any,
    deltas: Sequence[float],
    path: str | os.PathLike,
    *,
    title: str = "",
) -> Path:
    """Decoded class capsules with one dimension perturbed ([S17] Fig. 4).

    Args:
        grid: ``(D, steps, C, H, W)``: row d = dimension d perturbed by each delta.
        deltas: the perturbations, one per column.
        path: PNG file to write.
        title: figure title.
    """
    g = _to_numpy(grid)
    return plot_image_grid(
        g,
        path,
        title=title,
        row_labels=[f"dim {d}" for d in range(g.shape[0])],
        col_labels=[f"{v:+.2f}" for v in deltas],
        cell_inches=0.55,
    )


def plot_routing_histograms(
    distances: Sequence[Any],
    weights: Sequence[Any],
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    bins: int = 30,
    max_distance: float | None = None,
    title: str = "",
) -> Path:
    """Histograms of vote-to-mean distances weighted by assignment ([H18] Fig. 2).

    Rows are routing iterations, columns class capsules; each panel is the histogram of
    ``|vote_ij - mean_j|`` over children i, each weighted by its assignment to parent j.
    All panels share the y axis, so a panel's area is the assignment mass of that parent.

    Args:
        distances: per iteration, ``(I, O)`` distances for one input.
        weights: per iteration, ``(I, O)`` assignment weights.
        path: PNG file to write.
        class_names: column titles.
        bins: histogram bins (shared by all panels).
        max_distance: right end of the bins; default the 99th percentile of all distances.
        title: figure title.
    """
    d = [_to_numpy(x) for x in distances]
    w = [_to_numpy(x) for x in weights]
    if (
        not d
        or len(d) != len(w)
        or any(a.shape != b.shape or a.ndim != 2 for a, b in zip(d, w, strict=True))
    ):
        raise ValueError("distances and weights must be equal-length lists of (I, O) arrays")
    iterations, classes = len(d), d[0].shape[1]
    top = max_distance if max_distance is not None else float(np.percentile(np.stack(d), 99))
    edges = np.linspace(0.0, max(top, 1e-12), bins + 1)
    fig, axes = plt.subplots(
        iterations,
        classes,
        figsize=(1.35 * classes + 0.6, 1.15 * iterations + 0.6),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for t in range(iterations):
        for j in range(classes):
            ax = axes[t, j]
            counts, _ = np.histogram(d[t][:, j], bins=edges, weights=w[t][:, j])
            ax.stairs(counts, edges, fill=True, color="C0")
            ax.tick_params(labelsize=5, left=False, labelleft=False)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(2))
            if t < iterations - 1:
                ax.tick_params(bottom=False)
            if t == 0:
                ax.set_title(class_names[j] if class_names else str(j), fontsize=7)
            if j == 0:
                ax.set_ylabel(f"iter {t + 1}", fontsize=7)
    fig.supxlabel("distance of vote to parent mean (weighted by assignment)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.98, top=0.8 if title else 0.86, bottom=0.17,
                        wspace=0.08, hspace=0.12)  # fmt: skip
    return save_figure(fig, path, tight=False)


def plot_couplings(
    assignments: Sequence[Any],
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Coupling coefficients / assignments of one input after each iteration (heat maps).

    Children (rows) are sorted by the parent they finally prefer, so blocks show which
    children route where. The colour scale runs from 0 to the largest value shown.

    Args:
        assignments: per iteration, an ``(I, O)`` array.
        path: PNG file to write.
        class_names: column labels.
        title: figure title.
    """
    a = [_to_numpy(x) for x in assignments]
    if not a or any(x.ndim != 2 for x in a):
        raise ValueError("assignments must be a non-empty list of (I, O) arrays")
    final = a[-1]
    order = np.lexsort((-final.max(1), final.argmax(1)))
    top = max(float(x.max()) for x in a) or 1.0
    fig, axes = plt.subplots(1, len(a), figsize=(2.2 * len(a) + 0.8, 3.8), squeeze=False)
    for t, ax in enumerate(axes[0]):
        im = ax.imshow(
            a[t][order], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=top
        )
        ax.set_title(f"iteration {t + 1}", fontsize=8)
        ax.set_xticks(range(final.shape[1]))
        ax.set_xticklabels(class_names or range(final.shape[1]), fontsize=6, rotation=90)
        ax.set_yticks([])
        if t == 0:
            ax.set_ylabel(f"{final.shape[0]} children (sorted)", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_bars(
    values: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    ylabel: str,
    title: str = "",
    ylim: tuple[float, float] | None = None,
    fmt: str = "{:.3f}",
    intervals: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
) -> Path:
    """Grouped bar chart: ``{group: {series: value}}`` (e.g. {familiar: {capsules: .04}}).

    Args:
        values: outer keys are x groups, inner keys the bars of each group.
        path: PNG file to write.
        ylabel, title: labels.
        ylim: y-axis limits.
        fmt: format of the value printed on each bar.
        intervals: ``{group: {series: (low, high)}}`` drawn as error bars (e.g. 95 %
            confidence intervals).
    """
    groups = list(values)
    series: list[str] = []
    for g in groups:
        series += [s for s in values[g] if s not in series]
    if not groups or not series:
        raise ValueError("values must hold at least one group with one bar")
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(groups) * max(1, len(series) / 2)), 3.8))
    x = np.arange(len(groups))
    for k, s in enumerate(series):
        ys = [values[g].get(s, np.nan) for g in groups]
        yerr = None
        if intervals is not None:
            lows = [intervals.get(g, {}).get(s, (v, v))[0] for g, v in zip(groups, ys, strict=True)]
            highs = [
                intervals.get(g, {}).get(s, (v, v))[1] for g, v in zip(groups, ys, strict=True)
            ]
            yerr = np.abs(np.array([np.subtract(ys, lows), np.subtract(highs, ys)]))
        bars = ax.bar(
            x + (k - (len(series) - 1) / 2) * width, ys, width, label=s, yerr=yerr, capsize=3
        )
        ax.bar_label(bars, labels=["" if np.isnan(v) else fmt.format(v) for v in ys], fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_training_curves(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, x_key: str | None = None
) -> Path:
    """Training curves from ``metrics.jsonl`` rows: one panel per metric family.

    Numeric keys are grouped by their suffix after a split prefix (``train_loss`` and
    ``test_loss`` share the ``loss`` panel; ``train_accuracy`` and ``test_accuracy`` the
    ``accuracy`` panel); a note in parentheses stays in the legend only (``train_loss
    (final margin)`` is a loss curve). Rows lacking a key are skipped for that key.

    Args:
        rows: dicts, one per logged step or epoch.
        path: PNG file to write.
        x_key: the x axis; default ``"epoch"`` if present, else ``"step"``, else row index.
    """
    if not rows:
        raise ValueError("no metrics rows to plot")
    keys: list[str] = []
    for r in rows:
        keys += [
            k
            for k, v in r.items()
            if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
    if x_key is None:
        x_key = next((k for k in ("epoch", "step") if k in keys), None)
    skip = {x_key, "epoch", "step", "time", "timestamp", "wall_time", "elapsed", "lr_step"}
    prefixes = ("train_", "val_", "valid_", "test_", "eval_")
    families: dict[str, list[str]] = {}
    for k in keys:
        if k in skip:
            continue
        family = next((k[len(p) :] for p in prefixes if k.startswith(p)), k)
        family = family.split(" (")[0]  # "loss (final margin)" is a loss curve
        families.setdefault(family, []).append(k)
    if not families:
        raise ValueError(f"metrics rows hold no numeric series besides {x_key!r}")
    cols = min(3, len(families))
    nrows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.2 * nrows), squeeze=False)
    for ax, (family, members) in zip(axes.flat, families.items(), strict=False):
        all_positive = True
        for k in members:
            pts = [
                (r.get(x_key, i) if x_key else i, r[k])
                for i, r in enumerate(rows)
                if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                all_positive = all_positive and min(ys) > 0
                ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, label=k)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel(x_key or "row")
        if family.endswith("loss") and all_positive:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families) :]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
