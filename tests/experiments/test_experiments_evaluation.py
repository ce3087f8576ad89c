"""capsnet.experiments.evaluation: batches of stored images and accuracy."""

from __future__ import annotations

import pytest
import torch

from capsnet import experiments
from experiment_helpers import FakeDataset, TinyCNN


def test_eval_batches_and_accuracy():
    data = FakeDataset(10)
    batches = list(experiments.eval_batches(data, batch_size=4, max_examples=9))
    assert [len(b[1]) for b in batches] == [4, 4, 1]
    assert batches[0][0].dtype == torch.float32 and float(batches[0][0].max()) <= 1.0
    acc = experiments.evaluate_accuracy(TinyCNN(), data, batch_size=3)
    assert 0.0 <= acc <= 1.0
    with pytest.raises(TypeError, match="ImageDataset"):
        list(experiments.eval_batches(object()))
