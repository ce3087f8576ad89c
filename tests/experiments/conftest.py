"""Fixtures of the capsnet.experiments tests: one intra-op thread, two tiny trained runs.

The shared fakes live in ``tests/experiment_helpers.py`` next to ``training_helpers.py``
(``tests/conftest.py`` puts ``tests/`` on the import path).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread_here(one_thread):
    """Every experiments test runs on one intra-op thread (see tests/conftest.py)."""
    yield


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A tiny CapsNet (with decoder) and a CNN trained for one epoch on tiny MNIST files."""
    from capsnet.train import train
    from training_helpers import TINY_MODEL, make_mnist, tiny_config

    threads = torch.get_num_threads()  # session-scoped: set up before one_thread
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
