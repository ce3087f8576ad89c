"""Figures of ToyNORB for docs/data.md (rendered directly; the files hold the same bytes).

Run: ``python examples/toynorb_figures.py [--out docs/results/toynorb]``.

* ``instances.png``: every category (rows) and instance (columns) at elevation 40 deg,
  azimuth 40 deg, lighting 0, left camera; training instances marked.
* ``viewpoints.png``: one object over the 18 azimuths (columns) x 9 elevations (rows).
* ``lightings.png``: one view under the 6 lightings, and its stereo pair.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from capsnet.data.toynorb import (  # noqa: E402
    CATEGORIES,
    TRAIN_INSTANCES,
    build_object,
    render_views,
)
from capsnet.data.toynorb.render import AZIMUTHS, ELEVATIONS  # noqa: E402


def _grid(images, rows, cols, *, scale, row_labels=(), col_labels=(), title=""):
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale + 0.4), squeeze=False)
    for ax, image in zip(axes.ravel(), images, strict=True):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    for r, label in enumerate(row_labels):
        axes[r, 0].set_ylabel(label, fontsize=8)
    for c, label in enumerate(col_labels):
        axes[0, c].set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    height = rows * scale + 0.4
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - 0.3 / height))
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/toynorb", help="output folder")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    images = [
        render_views(build_object(c, i), [(40, 40)])[0, 0, 0]
        for c in range(len(CATEGORIES))
        for i in range(10)
    ]
    labels = [f"{i} ({'train' if i in TRAIN_INSTANCES else 'test'})" for i in range(10)]
    fig = _grid(
        images,
        5,
        10,
        scale=0.95,
        row_labels=CATEGORIES,
        col_labels=labels,
        title="ToyNORB: 5 categories x 10 instances (elevation 40, azimuth 40, light 0)",
    )
    fig.savefig(out / "instances.png", dpi=100)
    plt.close(fig)

    mesh = build_object(0, 7)
    views = [(e, a) for e in ELEVATIONS for a in AZIMUTHS]
    images = list(render_views(mesh, views)[:, 0, 0])
    fig = _grid(
        images,
        9,
        18,
        scale=0.62,
        row_labels=[f"el {e}" for e in ELEVATIONS],
        col_labels=[f"az {a}" for a in AZIMUTHS],
        title="ToyNORB animal 7 (training): 18 azimuths x 9 elevations, light 0",
    )
    fig.savefig(out / "viewpoints.png", dpi=100)
    plt.close(fig)

    views = render_views(build_object(3, 6), [(45, 120)])[0]  # (6 lightings, 2, 96, 96)
    images = [views[k, 0] for k in range(6)] + [views[0, 0], views[0, 1]]
    fig = _grid(
        images,
        1,
        8,
        scale=1.1,
        col_labels=[f"light {k}" for k in range(6)] + ["left", "right"],
        title="ToyNORB truck 6: the 6 lightings; stereo pair (light 0)",
    )
    fig.savefig(out / "lightings.png", dpi=100)
    plt.close(fig)
    print(f"figures written to {out}")


if __name__ == "__main__":
    main()
