"""The fused layers and hand-written backward passes on CUDA, against the reference.

Skipped without a GPU. float32 and bfloat16 autocast; the plain autograd reference
(:mod:`capsnet.functional.reference`) runs on the same device in float64 as ground truth.
``CAPSNET_TEST_DEVICE=cpu`` (or ``mps``) runs the same checks on another device.
"""

from __future__ import annotations

import os

import pytest
import torch

import capsnet.functional as CF
import capsnet.models as M
from capsnet.functional import reference as REF

DEV = os.environ.get("CAPSNET_TEST_DEVICE", "cuda")
KIND = torch.device(DEV).type
pytestmark = pytest.mark.skipif(
    KIND == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)


def _leaves(*xs, dtype=torch.float32):
    return [x.to(DEV, dtype).detach().requires_grad_() for x in xs]


def _project(outs, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)


@pytest.mark.parametrize("autocast", [False, True])
def test_dynamic_routing_on_cuda(autocast):
    u = torch.randn(4, 64, 10, 16)
    (a,), (b,) = _leaves(u), _leaves(u, dtype=torch.float64)
    with torch.autocast(KIND, dtype=torch.bfloat16, enabled=autocast):
        fast = CF.dynamic_routing(a, 3)
    ref = REF.dynamic_routing(b, 3)
    tol = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(fast[0].double(), ref[0], **tol)
    ga = torch.autograd.grad(_project(fast), a)[0]
    gb = torch.autograd.grad(_project(ref), b)[0]
    torch.testing.assert_close(ga.double(), gb, **tol)


@pytest.mark.parametrize("autocast", [False, True])
def test_em_routing_on_cuda(autocast):
    votes, acts = torch.randn(4, 72, 5, 16), torch.rand(4, 72)
    beta_u, beta_a = 0.1 * torch.randn(5), 0.1 * torch.randn(5)
    a = _leaves(votes, acts, beta_u, beta_a)
    b = _leaves(votes, acts, beta_u, beta_a, dtype=torch.float64)
    lambdas = [0.5, 1.0, 1.5]
    with torch.autocast(KIND, dtype=torch.bfloat16, enabled=autocast):
        fast = CF.em_routing(*a, 3, lambdas)
    ref = REF.em_routing(*b, lambdas)
    tol = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    for x, y in zip(fast, ref, strict=True):
        torch.testing.assert_close(x.double(), y, **tol)
    grads = torch.autograd.grad(_project(fast), a), torch.autograd.grad(_project(ref), b)
    for x, y in zip(*grads, strict=True):
        torch.testing.assert_close(x.double(), y, **tol)


@pytest.mark.parametrize("routing", ["faithful", "per_position"])
def test_fused_conv_capsules_on_cuda(routing):
    g = torch.Generator().manual_seed(0)
    poses = torch.randn(2, 6, 6, 4, 16, generator=g)
    acts = torch.rand(2, 6, 6, 4, generator=g)
    weight = torch.randn(9, 4, 3, 4, 4, generator=g) * 0.5
    beta_u, beta_a = 0.1 * torch.randn(3, generator=g), 0.1 * torch.randn(3, generator=g)
    a = _leaves(poses, acts, weight, beta_u, beta_a)
    b = _leaves(poses, acts, weight, beta_u, beta_a, dtype=torch.float64)
    lambdas = [0.5, 1.0]
    fast = CF.conv_matrix_capsules(
        *a, kernel_size=3, stride=1, iterations=2, inverse_temperatures=lambdas, routing=routing
    )
    ref = REF.conv_matrix_capsules(*b, lambdas, kernel_size=3, stride=1, routing=routing)
    for x, y in zip(fast, ref, strict=True):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(_project(fast), a), torch.autograd.grad(_project(ref), b)
    for x, y in zip(*grads, strict=True):
        torch.testing.assert_close(x.double(), y, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", M.list_models())
def test_every_model_trains_a_step_on_cuda(name):
    torch.manual_seed(0)
    model = M.create(name).to(DEV)
    x = torch.rand(2, model.in_channels, *model.input_size, device=DEV)
    with torch.autocast(KIND, dtype=torch.bfloat16):
        out = model(x, torch.tensor([0, 1], device=DEV))
    out.scores.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
