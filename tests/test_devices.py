"""capsnet.devices.resolve_device: one rule for "auto" everywhere, clear errors."""

import pytest
import torch

from capsnet.devices import resolve_device


def test_auto_is_cuda_when_present_else_cpu(monkeypatch):
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device() == resolve_device("auto") == expected
    # MPS is never picked by "auto", even where it works.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("mps") == torch.device("mps")


def test_names_and_devices(monkeypatch):
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "meta", ""])
def test_bad_names_list_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"device must be one of 'auto', 'cpu', 'cuda'"):
        resolve_device(name)


def test_unavailable_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(TypeError, match="str or torch.device"):
        resolve_device(0)


def test_every_old_location_is_the_one_resolver():
    from capsnet import distributed, experiments
    from capsnet.data import loader

    assert distributed.resolve_device is loader.resolve_device is resolve_device
    assert experiments.resolve_device is resolve_device
