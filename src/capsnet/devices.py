"""Device names to ``torch.device``: the one rule every command and loader uses.

``"auto"`` means **CUDA when available, else the CPU**. Apple's MPS is used only when asked
for (``"mps"``): capsnet's evaluation accumulates counts in float64, which MPS does not
support, so picking it silently would make ``capsnet evaluate`` fail where ``capsnet
train`` worked. Under ``torchrun`` a bare ``"cuda"`` (and ``"auto"``) selects the GPU of
the process's ``LOCAL_RANK``.

>>> resolve_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

import torch

__all__ = ["DEVICE_CHOICES", "resolve_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
"""What ``--device`` accepts (``cuda:N``: GPU number N)."""


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The ``torch.device`` for a device name, checked to be usable here.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, ``"mps"``, or a ``torch.device``.
        local_rank: the GPU a bare ``"cuda"`` or ``"auto"`` selects (torchrun's
            ``LOCAL_RANK``).

    Raises:
        ValueError: ``name`` is not a device name.
        RuntimeError: the device is not available on this machine.
    """
    device: torch.device | None
    if isinstance(name, torch.device):
        device = name
    elif isinstance(name, str):
        text = name.strip().lower()
        if text == "auto":
            text = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(text)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda", "mps"):
            valid = ", ".join(map(repr, DEVICE_CHOICES))
            raise ValueError(f"device must be one of {valid}, got {name!r}") from None
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(name).__name__}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(name)!r} requested but CUDA is not available; use cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:
            raise RuntimeError(
                f"device {str(device)!r} requested but this machine has {count} CUDA "
                f"device(s): cuda:0 ... cuda:{count - 1}"
            )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RuntimeError(f"device {str(name)!r} requested but MPS is not available; use cpu")
    return device
