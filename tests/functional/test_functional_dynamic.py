"""capsnet.functional: dynamic routing, [S17] Procedure 1, against the float64 loops of loops.py."""

from __future__ import annotations

import pytest
import torch
from loops import DT, rand, ref_dynamic_routing

import capsnet.functional as CF


class TestDynamicRouting:
    @pytest.mark.parametrize(
        "shape,iterations",
        [((2, 6, 3, 4), 3), ((1, 9, 5, 8), 1), ((3, 4, 2, 16), 2), ((2, 3, 7, 4, 5), 3)],
    )
    def test_matches_loops(self, shape, iterations):
        u_hat = rand(*shape, seed=sum(shape))
        v, c = CF.dynamic_routing(u_hat, iterations)
        flat_u = u_hat.reshape(-1, *shape[-3:])
        flat_v, flat_c = v.reshape(-1, *v.shape[-2:]), c.reshape(-1, *c.shape[-2:])
        for n in range(flat_u.shape[0]):
            rv, rc = ref_dynamic_routing(flat_u[n], iterations)
            torch.testing.assert_close(flat_v[n], rv)
            torch.testing.assert_close(flat_c[n], rc)

    def test_coupling_coefficients_sum_to_one_over_parents(self):
        _, c = CF.dynamic_routing(rand(4, 30, 10, 16), 3)
        torch.testing.assert_close(c.sum(-1), torch.ones(4, 30, dtype=DT))

    def test_first_iteration_is_uniform(self):
        _, c = CF.dynamic_routing(rand(2, 5, 4, 3), 1)
        torch.testing.assert_close(c, torch.full_like(c, 0.25))

    def test_permuting_children_changes_nothing(self):
        u_hat = rand(2, 12, 5, 8)
        perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
        v, c = CF.dynamic_routing(u_hat, 3)
        v2, c2 = CF.dynamic_routing(u_hat[:, perm], 3)
        torch.testing.assert_close(v2, v)
        torch.testing.assert_close(c2, c[:, perm])

    def test_gradcheck(self):
        u_hat = rand(2, 4, 3, 5, scale=0.5).requires_grad_()
        assert torch.autograd.gradcheck(lambda u: CF.dynamic_routing(u, 3), (u_hat,))

    def test_gradient_flows_through_inner_iterations_by_default(self):
        u_hat = rand(2, 6, 3, 4).requires_grad_()
        v, _ = CF.dynamic_routing(u_hat, 3)
        g_full = torch.autograd.grad(v.pow(2).sum(), u_hat)[0]
        v_d, c_d = CF.dynamic_routing(u_hat, 3, detach_inner=True)
        g_det = torch.autograd.grad(v_d.pow(2).sum(), u_hat)[0]
        torch.testing.assert_close(v_d, v)  # same forward values
        assert not torch.allclose(g_full, g_det)
        # detached variant: the coupling coefficients are constants for the gradient
        c_const = c_d.detach()

        def last_iteration(u):
            return CF.squash(torch.einsum("...io,...iod->...od", c_const, u))

        g_ref = torch.autograd.grad(last_iteration(u_hat).pow(2).sum(), u_hat)[0]
        torch.testing.assert_close(g_det, g_ref)

    @pytest.mark.parametrize("case", ["zeros", "identical", "single_child", "huge"])
    def test_degenerate_inputs_finite(self, case):
        u_hat = {
            "zeros": torch.zeros(2, 8, 4, 6, dtype=DT),
            "identical": rand(1, 1, 4, 6).expand(2, 8, 4, 6).clone(),
            "single_child": rand(2, 1, 4, 6),
            "huge": rand(2, 8, 4, 6, scale=1e3),
        }[case].requires_grad_()
        v, c = CF.dynamic_routing(u_hat, 3)
        v.sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(c).all()
        assert torch.isfinite(u_hat.grad).all()

    def test_bfloat16_autocast(self):
        x = torch.randn(2, 8, 8)
        w = torch.randn(8, 4 * 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u_hat = (x @ w).reshape(2, 8, 4, 16)
            v, c = CF.dynamic_routing(u_hat, 3)
        v.float().sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(w.grad).all()

    def test_errors_name_the_expected_shape(self):
        with pytest.raises(ValueError, match="in_caps, out_caps, dim"):
            CF.dynamic_routing(torch.randn(4, 5))
        with pytest.raises(TypeError):
            CF.dynamic_routing(torch.ones(2, 3, 4, 5, dtype=torch.int64))
        with pytest.raises(ValueError, match="iterations"):
            CF.dynamic_routing(torch.randn(2, 3, 4, 5), iterations=0)


# --------------------------------------------------------------------------- EM routing
