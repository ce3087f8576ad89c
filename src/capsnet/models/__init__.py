"""Capsule network models and the papers' baseline CNNs, built through a registry.

>>> import capsnet
>>> model = capsnet.models.create("capsnet")           # Sabour et al. 2017, MNIST
>>> out = model(torch.rand(2, 1, 28, 28))               # ModelOutput(scores, poses, reconstructions)
"""

from capsnet.models.registry import (
    ModelInfo,
    ModelOutput,
    create,
    list_models,
    model_info,
    register_model,
)

__all__ = ["ModelInfo", "ModelOutput", "create", "list_models", "model_info", "register_model"]
