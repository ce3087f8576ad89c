"""Capsule network models and the papers' baseline CNNs, built through a registry.

>>> import torch, capsnet.models
>>> model = capsnet.models.create("capsnet")           # Sabour et al. 2017, MNIST
>>> out = model(torch.rand(2, 1, 28, 28))  # ModelOutput(scores, poses, reconstructions)
>>> capsnet.models.list_models()
['capsnet', 'hinton_cnn', 'matrix_capsnet', 'sabour_cnn']
"""

from capsnet.models.baselines import HintonCNN, SabourCNN
from capsnet.models.capsnet import CapsNet
from capsnet.models.matrix_capsnet import MatrixCapsNet
from capsnet.models.registry import (
    ModelInfo,
    ModelOutput,
    create,
    legacy_kwargs,
    list_models,
    model_info,
    record_kwargs,
    register_model,
    restore_kwargs,
)

__all__ = [
    "ModelInfo",
    "ModelOutput",
    "create",
    "list_models",
    "model_info",
    "register_model",
    "legacy_kwargs",
    "restore_kwargs",
    "record_kwargs",
    "CapsNet",
    "MatrixCapsNet",
    "SabourCNN",
    "HintonCNN",
]
