"""Fixtures for the data tests: an isolated data root and tiny datasets in real formats."""

from __future__ import annotations

import pytest
from data_writers import write_mnist


@pytest.fixture(autouse=True)
def isolated_data_root(tmp_path, monkeypatch):
    """Keep every test away from the user's real data root and cache."""
    monkeypatch.setenv("CAPSNET_DATA", str(tmp_path / "default-root"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield


@pytest.fixture
def mnist_root(tmp_path):
    """A data root with a tiny fake MNIST (60 train, 20 test) in ``<root>/mnist``."""
    root = tmp_path / "root"
    arrays = write_mnist(root / "mnist")
    return root, arrays
