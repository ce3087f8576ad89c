"""capsnet: capsule networks in PyTorch.

Dynamic routing between capsules (Sabour, Frosst & Hinton 2017) and matrix capsules
with EM routing (Hinton, Sabour & Frosst 2018).

* :mod:`capsnet.functional`: pure math (squash, routing, losses).
* :mod:`capsnet.layers`: ``nn.Module`` capsule layers.
* :mod:`capsnet.models`: the papers' models and baselines through a registry.
* :mod:`capsnet.data`: datasets with the papers' preprocessing and a fast batch loader.
* :func:`capsnet.load`: a trained model back from a run directory or checkpoint
  (:func:`capsnet.runs.load_run` also gives its config and dataset).
"""

from __future__ import annotations

import importlib
from typing import Any

from capsnet import functional, layers, models

__version__ = "0.1.0"

__all__ = ["functional", "layers", "models", "data", "load", "__version__"]


def __getattr__(name: str) -> Any:
    # Heavier parts load on first use, so `import capsnet` stays quick.
    if name == "data":
        return importlib.import_module("capsnet.data")
    if name == "load":
        return importlib.import_module("capsnet.runs").load_model
    raise AttributeError(f"module 'capsnet' has no attribute {name!r}")
