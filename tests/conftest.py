"""Shared test setup: ``tests/`` on the import path and the one-thread fixture.

The helper modules beside this file (``training_helpers``, ``experiment_helpers``) and in
``functional/`` (``loops``) are imported by name from any test folder; the folders have
no ``__init__.py`` (pytest's rootdir-relative imports), so ``tests/`` is put on the path
here once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only cost (badly so on a busy machine).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
