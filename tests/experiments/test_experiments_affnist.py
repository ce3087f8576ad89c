"""capsnet.experiments.affnist: the affine test set must match the models' input size."""

from __future__ import annotations

import pytest

from capsnet import experiments
from experiment_helpers import tiny_capsnet


def test_affnist_experiment_names_the_size_mismatch(tmp_path):
    from types import SimpleNamespace

    affine = SimpleNamespace(input_size=(40, 40), name="affnist_generated")
    with pytest.raises(ValueError, match="28x28 images but the affine test set has 40x40"):
        experiments.affnist_experiment({"capsnet": tiny_capsnet()}, affine, affine, tmp_path)
