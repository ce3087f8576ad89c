"""torch.compile(model) works on every registered model and gives the same results (CPU).

Slow (inductor compiles C++ kernels: about 10-40 s per model on 2 cores), so marked slow;
CI runs it.
"""

from __future__ import annotations

import pytest
import torch

import capsnet.models as M

SMALL = {
    "capsnet": {"conv_channels": 8, "primary_types": 2, "primary_dim": 4, "class_dim": 4},
    "matrix_capsnet": {"A": 8, "B": 2, "C": 2, "D": 2, "iterations": 2},
    "sabour_cnn": {},
    "hinton_cnn": {},
}


def test_every_registered_model_is_covered():
    assert sorted(SMALL) == M.list_models()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_compiled_model_matches_eager(name):
    torch.manual_seed(0)
    model = M.create(name, **SMALL[name])
    x = torch.rand(3, model.in_channels, *model.input_size)
    targets = torch.tensor([0, 1, 2])
    compiled = torch.compile(model)
    model.eval()
    with torch.no_grad():
        eager_out, compiled_out = model(x), compiled(x)
    torch.testing.assert_close(compiled_out.scores, eager_out.scores, rtol=1e-4, atol=1e-5)
    # training mode with a backward pass: the same gradients (dropout off: compiled code
    # draws its masks from another random stream)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        fn(x, targets).scores.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
