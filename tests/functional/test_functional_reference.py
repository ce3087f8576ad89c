"""kernels == reference == float64 loops.

:mod:`capsnet.functional.reference` is the plain autograd form of the equations; the fast
kernels behind the public functions must give the same values and the same gradients,
and the reference must agree with the loops of loops.py.
"""

from __future__ import annotations

import pytest
import torch
from loops import (
    DT,
    conv_capsule_inputs,
    gather_children,
    rand,
    ref_conv_em_routing,
    ref_dynamic_routing,
    ref_em_routing,
)

import capsnet.functional as CF
from capsnet.functional import reference as REF


def _grads(outputs, inputs, seed=0):
    """Gradients of a fixed random projection of ``outputs`` w.r.t. ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(total, inputs)


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


class TestDynamicRouting:
    @pytest.mark.parametrize("detach_inner", [False, True])
    def test_kernel_equals_reference(self, detach_inner):
        u_hat = rand(3, 7, 4, 5, seed=1)
        (a,), (b,) = _leaves(u_hat), _leaves(u_hat)
        fast = CF.dynamic_routing(a, 3, detach_inner=detach_inner)
        ref = REF.dynamic_routing(b, 3, detach_inner=detach_inner)
        for x, y in zip(fast, ref, strict=True):
            torch.testing.assert_close(x, y)
        torch.testing.assert_close(_grads(fast, [a])[0], _grads(ref, [b])[0])

    def test_reference_equals_loops(self):
        u_hat = rand(2, 6, 3, 4, seed=2)
        v, c = REF.dynamic_routing(u_hat, 3)
        for n in range(2):
            rv, rc = ref_dynamic_routing(u_hat[n], 3)
            torch.testing.assert_close(v[n], rv)
            torch.testing.assert_close(c[n], rc)


class TestEMRouting:
    @pytest.mark.parametrize("normalize", [False, True])
    def test_kernel_equals_reference(self, normalize):
        votes, acts = rand(2, 9, 4, 16, seed=3), torch.rand(2, 9, dtype=DT)
        beta_u, beta_a = rand(4, seed=4, scale=0.5), rand(4, seed=5, scale=0.5)
        lambdas = [0.5, 1.0, 2.0]
        a, b = _leaves(votes, acts, beta_u, beta_a), _leaves(votes, acts, beta_u, beta_a)
        fast = CF.em_routing(*a, 3, lambdas, normalize_cost=normalize)
        ref = REF.em_routing(*b, lambdas, normalize_cost=normalize)
        for x, y in zip(fast, ref, strict=True):
            torch.testing.assert_close(x, y)
        for x, y in zip(_grads(fast, a), _grads(ref, b), strict=True):
            torch.testing.assert_close(x, y)

    def test_reference_equals_loops(self):
        votes, acts = rand(2, 6, 3, 4, seed=6), torch.rand(2, 6, dtype=DT)
        beta_u, beta_a = rand(3, seed=7, scale=0.5), rand(3, seed=8, scale=0.5)
        lambdas = [1.0, 2.0]
        poses, out_a, R = REF.em_routing(votes, acts, beta_u, beta_a, lambdas)
        for n in range(2):
            rp, ra, rR = ref_em_routing(votes[n], acts[n], beta_u, beta_a, lambdas)
            torch.testing.assert_close(poses[n], rp)
            torch.testing.assert_close(out_a[n], ra)
            torch.testing.assert_close(R[n], rR)

    def test_beta_with_more_dims_than_the_batch_is_refused(self):
        votes, acts = rand(2, 6, 3, 4), torch.rand(2, 6, dtype=DT)
        with pytest.raises(ValueError, match=r"beta_u must be broadcastable to \(\.\.\., out_caps"):
            CF.em_routing(votes, acts, torch.zeros(5, 2, 3, dtype=DT), 0.0)
        # one beta per example and parent is allowed
        per_example = rand(2, 3, seed=9)
        fast = CF.em_routing(votes, acts, per_example, 0.0, 2, [1.0, 1.0])
        ref = REF.em_routing(votes, acts, per_example, torch.tensor(0.0, dtype=DT), [1.0, 1.0])
        torch.testing.assert_close(fast[0], ref[0])


class TestConvolutional:
    def test_conv_em_kernel_equals_reference_and_loops(self):
        g = torch.Generator().manual_seed(11)
        h = w = 4
        k, stride, types, n_out = 3, 1, 2, 3
        child_votes = torch.randn(1, h, w, types, n_out, 4, generator=g, dtype=DT)
        votes = gather_children(child_votes, k, stride)
        votes = votes + 0.1 * torch.randn(votes.shape, generator=g, dtype=DT)
        acts = gather_children(torch.rand(1, h, w, types, generator=g, dtype=DT), k, stride)
        beta_u, beta_a = rand(n_out, seed=12, scale=0.3), rand(n_out, seed=13, scale=0.3)
        lambdas = [0.1, 0.2, 0.3]
        geo = {"in_size": (h, w), "kernel_size": k, "stride": stride}
        a, b = _leaves(votes, acts, beta_u, beta_a), _leaves(votes, acts, beta_u, beta_a)
        fast = CF.conv_em_routing(*a, iterations=3, inverse_temperatures=lambdas, **geo)
        ref = REF.conv_em_routing(*b, lambdas, **geo)
        for x, y in zip(fast, ref, strict=True):
            torch.testing.assert_close(x, y)
        for x, y in zip(_grads(fast, a), _grads(ref, b), strict=True):
            torch.testing.assert_close(x, y)
        loops = ref_conv_em_routing(votes[0], acts[0], beta_u, beta_a, (h, w), k, stride, lambdas)
        for x, y in zip(ref, loops, strict=True):
            torch.testing.assert_close(x[0], y)

    def test_conv_votes_equal_reference(self):
        poses, acts, weight, _, _ = conv_capsule_inputs(2, 5, 4, 2, 3, 3, seed=3)
        fast = CF.conv_capsule_votes(poses, acts, weight, 3, 1)
        ref = REF.conv_capsule_votes(poses, acts, weight, 3, 1)
        for x, y in zip(fast, ref, strict=True):
            torch.testing.assert_close(x, y)
