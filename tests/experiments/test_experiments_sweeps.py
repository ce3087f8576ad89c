"""capsnet.experiments.sweeps: accuracy vs rotation / translation / scale."""

from __future__ import annotations

import pytest
import torch

from capsnet import experiments
from experiment_helpers import FakeDataset, TinyCNN


@pytest.mark.parametrize("kind", ["rotation", "translation", "scale"])
def test_transform_sweep(tmp_path, kind):
    values = {"rotation": [-20, 0, 20], "translation": [0, 3], "scale": [0.8, 1.0]}[kind]
    rec = experiments.transform_sweep(
        {"cnn": TinyCNN()}, FakeDataset(6), tmp_path, kind=kind, values=values, train_range=(0, 0)
    )
    acc = rec["results"]["accuracy"]["cnn"]
    assert len(acc) == len(values)
    # the identity transform gives the plain accuracy
    plain = experiments.evaluate_accuracy(TinyCNN(), FakeDataset(6))
    torch.manual_seed(0)
    assert (tmp_path / f"{kind}_sweep.png").stat().st_size > 1000
    assert 0 <= plain <= 1
    with pytest.raises(ValueError, match="kind"):
        experiments.transform_sweep({"cnn": TinyCNN()}, FakeDataset(2), tmp_path, kind="shear")
