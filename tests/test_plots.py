"""capsnet.plots: every figure is written as a real, non-empty PNG; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capsnet import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=2000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > 50 and img.shape[1] > 50
    assert img[..., :3].std() > 0.01  # not a blank canvas
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temp file left behind


def attack_run(method, targeted, acc):
    return {
        "method": method,
        "targeted": targeted,
        "epsilons": [0.0, 0.1, 0.2],
        "accuracy": acc,
        "success_rate": [1 - a for a in acc],
    }


def test_plot_lines(tmp_path):
    path = plots.plot_lines(
        [-30, 0, 30],
        {"capsules": [0.5, 0.99, 0.6], "cnn": [0.4, 0.99, 0.45]},
        tmp_path / "sub" / "lines.png",
        xlabel="angle",
        ylabel="accuracy",
        shade=(-10, 10),
        styles={"cnn": "--"},
    )
    assert path == tmp_path / "sub" / "lines.png"
    assert_png(path)
    with pytest.raises(ValueError, match="values"):
        plots.plot_lines([1, 2], {"a": [1.0]}, tmp_path / "bad.png", xlabel="x", ylabel="y")


def test_plot_attack_curves(tmp_path):
    results = {
        "capsules": [
            attack_run("fgsm", False, [0.99, 0.7, 0.4]),
            attack_run("bim", True, [0.99, 0.5, 0.2]),
        ],
        "cnn": [
            attack_run("fgsm", False, [0.99, 0.4, 0.1]),
            attack_run("bim", True, [0.99, 0.3, 0.0]),
        ],
    }
    assert_png(plots.plot_attack_curves(results, tmp_path / "attack.png", title="t"))
    with pytest.raises(ValueError, match="no attack"):
        plots.plot_attack_curves({"a": []}, tmp_path / "empty.png")


def test_image_grids(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(7, 1, 12, 12, generator=g)
    assert_png(plots.plot_reconstructions(images, images.flip(-1), tmp_path / "rec.png", per_row=4))
    rgb = np.random.default_rng(0).random((2, 3, 3, 8, 8))
    assert_png(plots.plot_image_grid(rgb, tmp_path / "rgb.png", row_labels=["a", "b"]))
    grid = torch.rand(16, 11, 1, 10, 10, generator=g)
    deltas = [-0.25 + 0.05 * k for k in range(11)]
    assert_png(plots.plot_pose_perturbation(grid, deltas, tmp_path / "pert.png", title="digit 3"))
    with pytest.raises(ValueError, match="rows, cols"):
        plots.plot_image_grid(torch.rand(3, 1, 8, 8), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="shape"):
        plots.plot_reconstructions(images, images[:3], tmp_path / "bad.png")


def test_routing_figures(tmp_path):
    g = torch.Generator().manual_seed(0)
    dist = [torch.rand(50, 5, generator=g) for _ in range(3)]
    weights = [torch.softmax(torch.randn(50, 5, generator=g), -1) for _ in range(3)]
    assert_png(
        plots.plot_routing_histograms(
            dist, weights, tmp_path / "hist.png", class_names=list("abcde"), title="x"
        )
    )
    assert_png(plots.plot_couplings(weights, tmp_path / "coupling.png", class_names=list("abcde")))
    with pytest.raises(ValueError, match="equal-length"):
        plots.plot_routing_histograms(dist, weights[:2], tmp_path / "bad.png")


def test_plot_bars(tmp_path):
    values = {"familiar": {"capsules": 0.04, "cnn": 0.05}, "novel": {"capsules": 0.13, "cnn": 0.2}}
    assert_png(plots.plot_bars(values, tmp_path / "bars.png", ylabel="error", title="views"))
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_bars({}, tmp_path / "bad.png", ylabel="y")


def test_plot_training_curves(tmp_path):
    rows = [{"kind": "start", "model": "capsnet"}]
    for epoch in range(1, 5):
        rows.append({"epoch": epoch - 0.5, "train_loss": 1.0 / epoch, "train_accuracy": 0.5})
        rows.append({"epoch": epoch, "test_loss": 0.8 / epoch, "test_accuracy": 0.9 + 0.02 * epoch})
    assert_png(plots.plot_training_curves(rows, tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="no numeric"):
        plots.plot_training_curves([{"epoch": 1}], tmp_path / "bad.png")


def test_failed_plot_leaves_no_file(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_lines([1], {"a": [1.0, 2.0]}, tmp_path / "x.png", xlabel="x", ylabel="y")
    assert list(tmp_path.iterdir()) == []
