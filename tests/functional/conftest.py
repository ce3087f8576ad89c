"""Fixtures of the capsnet.functional tests."""

from __future__ import annotations

import pytest

from capsnet.functional._kernels import em as EM_KERNEL


@pytest.fixture(params=["one chunk", "many chunks"])
def chunking(request, monkeypatch):
    """Route in one chunk, or in the smallest chunks (one example each) on the CPU."""
    if request.param == "many chunks":
        monkeypatch.setattr(EM_KERNEL, "EM_CHUNK_BYTES", 1)
    else:
        monkeypatch.setattr(EM_KERNEL, "EM_CHUNK_BYTES", 1 << 40)
    return request.param
