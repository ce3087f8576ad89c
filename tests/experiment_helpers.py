"""Shared fakes of the experiment tests: a tiny ImageDataset-like set and tiny models.

Used by ``tests/experiments/`` and ``tests/test_report.py``.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from capsnet.models import ModelOutput, create


class FakeDataset:
    """The ImageDataset contract in miniature: uint8 images, labels, classes, eval_transform."""

    def __init__(self, n: int = 24, size: int = 28, num_classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = (torch.rand(n, 1, size, size, generator=g) * 255).to(torch.uint8)
        self.labels = torch.arange(n) % num_classes
        self.num_classes = num_classes
        self.classes = [f"c{k}" for k in range(num_classes)]
        self.name = "fake"

    def eval_transform(self, x):
        return x

    def __len__(self):
        return len(self.labels)


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, images, targets=None):
        f = self.features(images)
        return ModelOutput(self.fc(f), f, None)


def tiny_capsnet(**kw):
    torch.manual_seed(0)
    return create("capsnet", conv_channels=8, primary_types=2, **kw).eval()


def tiny_matrix():
    torch.manual_seed(0)
    return create("matrix_capsnet", A=8, B=2, C=2, D=2, iterations=3).eval()


def load_json(path):
    with open(path) as f:
        return json.load(f)
