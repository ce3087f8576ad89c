"""Fixtures of the capsnet.experiments tests: one intra-op thread, two tiny trained runs.

The shared fakes live in ``tests/experiment_helpers.py`` next to ``training_helpers.py``;
this folder has no ``__init__.py`` (like ``tests/data``), so ``tests/`` is put on the
import path here for ``from experiment_helpers import ...`` and ``from training_helpers
import ...`` to resolve however pytest is started.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only cost (badly so on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A tiny CapsNet (with decoder) and a CNN trained for one epoch on tiny MNIST files."""
    from capsnet.train import train
    from training_helpers import TINY_MODEL, make_mnist, tiny_config

    threads = torch.get_num_threads()  # set up before the module's _one_thread
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("runs")
        root = make_mnist(tmp / "data", n_train=32, n_test=24)
        caps_kwargs = {**TINY_MODEL, "reconstruction": True}
        caps = train(tiny_config(root, tmp / "caps", model_kwargs=caps_kwargs, epochs=1)).run_dir
        cnn = train(tiny_config(root, tmp / "cnn", model="hinton_cnn", model_kwargs={}, epochs=1))
    finally:
        torch.set_num_threads(threads)
    return root, caps, cnn.run_dir
