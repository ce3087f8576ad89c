"""capsnet.experiments.records: JSON records in plain types, written atomically."""

from __future__ import annotations

import pytest
import torch

from capsnet import experiments
from experiment_helpers import load_json as load


def test_write_json_plain_types(tmp_path):
    path = experiments.write_json(
        tmp_path / "a" / "r.json", {"t": torch.tensor([1.5, 2.0]), "n": float("nan"), "k": (1, 2)}
    )
    assert load(path) == {"t": [1.5, 2.0], "n": None, "k": [1, 2]}
    with pytest.raises(TypeError, match="JSON"):
        experiments.write_json(tmp_path / "b.json", {"x": object()})
    assert not (tmp_path / "b.json").exists()
