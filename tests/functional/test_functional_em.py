"""capsnet.functional: EM routing and convolutional EM routing, [H18] Procedure 1.

Checked against the float64 loops of loops.py (the equations of docs/spec.md).
"""

from __future__ import annotations

import pytest
import torch
from loops import DT, gather_children, rand, ref_conv_em_routing, ref_em_routing

import capsnet.functional as CF


class TestEMRouting:
    @pytest.mark.parametrize(
        "batch,n_in,n_out,dim,lambdas,normalize",
        [
            ((2,), 6, 3, 4, [1.0, 2.0, 3.0], False),
            ((1,), 9, 4, 16, [0.01, 0.02], False),
            ((2, 3), 5, 2, 4, [1.0], False),
            ((2,), 7, 5, 16, [1.0, 2.0, 3.0], True),
            ((1,), 4, 3, 4, [0.5, 1.0, 1.5, 2.0], True),
        ],
    )
    def test_matches_loops(self, batch, n_in, n_out, dim, lambdas, normalize):
        seed = n_in * 10 + n_out
        votes = rand(*batch, n_in, n_out, dim, seed=seed)
        acts = torch.rand(*batch, n_in, generator=torch.Generator().manual_seed(seed), dtype=DT)
        beta_u, beta_a = rand(n_out, seed=1, scale=0.5), rand(n_out, seed=2, scale=0.5)
        poses, out_a, R = CF.em_routing(
            votes, acts, beta_u, beta_a, len(lambdas), lambdas, normalize_cost=normalize
        )
        fv, fa = votes.reshape(-1, n_in, n_out, dim), acts.reshape(-1, n_in)
        fp, foa, fR = (
            poses.reshape(-1, n_out, dim),
            out_a.reshape(-1, n_out),
            R.reshape(-1, n_in, n_out),
        )
        for n in range(fv.shape[0]):
            rp, ra, rR = ref_em_routing(fv[n], fa[n], beta_u, beta_a, lambdas, normalize)
            torch.testing.assert_close(fp[n], rp)
            torch.testing.assert_close(foa[n], ra)
            torch.testing.assert_close(fR[n], rR)

    def test_default_schedule(self):
        assert CF.default_inverse_temperatures(1) == [1.0]
        assert CF.default_inverse_temperatures(3) == [1.0, 2.0, 3.0]
        votes, acts = rand(2, 6, 3, 4), torch.rand(2, 6, dtype=DT)
        a = CF.em_routing(votes, acts, 0.1, -0.2, iterations=3)
        b = CF.em_routing(votes, acts, 0.1, -0.2, 3, [1.0, 2.0, 3.0])
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)

    def test_output_activation_is_logistic_not_softmax(self):
        # One parent: a softmax over parents would always give 1.
        votes, acts = rand(3, 10, 1, 16), torch.rand(3, 10, dtype=DT)
        _, out_a, _ = CF.em_routing(votes, acts, 0.0, 0.0, 1, [0.01])
        assert ((out_a > 0) & (out_a < 1)).all()
        assert not torch.allclose(out_a, torch.ones_like(out_a))

    def test_assignments_sum_to_one(self):
        _, _, R = CF.em_routing(rand(4, 20, 6, 16), torch.rand(4, 20, dtype=DT), 0.0, 0.0, 3)
        torch.testing.assert_close(R.sum(-1), torch.ones(4, 20, dtype=DT))

    def test_permuting_children_changes_nothing(self):
        votes, acts = rand(2, 12, 4, 16), torch.rand(2, 12, dtype=DT)
        perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
        p, a, R = CF.em_routing(votes, acts, 0.1, 0.1, 3, [0.01, 0.02, 0.03])
        p2, a2, R2 = CF.em_routing(votes[:, perm], acts[:, perm], 0.1, 0.1, 3, [0.01, 0.02, 0.03])
        torch.testing.assert_close(p2, p)
        torch.testing.assert_close(a2, a)
        torch.testing.assert_close(R2, R[:, perm])

    def test_input_activations_weight_the_m_step(self):
        """A child with zero activation has no influence on the parents' means."""
        votes, acts = rand(1, 8, 3, 4), torch.rand(1, 8, dtype=DT) + 0.1
        acts[0, 0] = 0.0
        p, a, _ = CF.em_routing(votes, acts, 0.0, 0.0, 2, [0.01, 0.02])
        moved = votes.clone()
        moved[0, 0] += 100.0
        p2, a2, _ = CF.em_routing(moved, acts, 0.0, 0.0, 2, [0.01, 0.02])
        torch.testing.assert_close(p2, p)
        torch.testing.assert_close(a2, a)

    def test_activation_gradient_is_not_vanishing(self):
        votes = rand(2, 16, 4, 16, scale=0.3)
        acts = torch.rand(2, 16, dtype=DT).requires_grad_()
        _, out_a, _ = CF.em_routing(votes, acts, 0.0, 0.0, 3, [0.01, 0.02, 0.03])
        (g,) = torch.autograd.grad(out_a.sum(), acts)
        assert g.abs().max() > 1e-4

    @pytest.mark.parametrize("normalize", [False, True])
    def test_gradcheck(self, normalize):
        votes = rand(2, 5, 3, 4, scale=0.5).requires_grad_()
        acts = (torch.rand(2, 5, dtype=DT) * 0.8 + 0.1).requires_grad_()
        beta_u = rand(3, seed=4, scale=0.1).requires_grad_()
        beta_a = rand(3, seed=5, scale=0.1).requires_grad_()

        def fn(v, a, bu, ba):
            return CF.em_routing(v, a, bu, ba, 3, [0.05, 0.1, 0.15], normalize_cost=normalize)

        assert torch.autograd.gradcheck(fn, (votes, acts, beta_u, beta_a))

    @pytest.mark.parametrize("case", ["zero_acts", "identical", "single_child", "huge"])
    @pytest.mark.parametrize("normalize", [False, True])
    def test_degenerate_inputs_finite(self, case, normalize):
        votes = rand(2, 8, 4, 16)
        acts = torch.rand(2, 8, dtype=DT)
        if case == "zero_acts":
            acts = torch.zeros(2, 8, dtype=DT)
        elif case == "identical":
            votes = rand(1, 1, 4, 16).expand(2, 8, 4, 16).clone()
        elif case == "single_child":
            votes, acts = votes[:, :1], acts[:, :1]
        elif case == "huge":
            votes = votes * 1e3
        votes.requires_grad_()
        acts.requires_grad_()
        outs = CF.em_routing(votes, acts, 0.0, 0.0, 3, normalize_cost=normalize)
        sum(o.sum() for o in outs[:2]).backward()
        for t in (*outs, votes.grad, acts.grad):
            assert torch.isfinite(t).all()

    def test_bfloat16_autocast(self):
        x = torch.randn(2, 10, 16)
        w = torch.randn(16, 3 * 16, requires_grad=True)
        acts = torch.rand(2, 10)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            votes = (x @ w).reshape(2, 10, 3, 16)
            outs = CF.em_routing(votes, acts, torch.zeros(3), torch.zeros(3), 3)
        outs[0].float().sum().backward()
        assert all(torch.isfinite(o).all() for o in outs)
        assert torch.isfinite(w.grad).all()

    def test_errors(self):
        with pytest.raises(ValueError, match="activations must have shape"):
            CF.em_routing(torch.randn(2, 5, 3, 16), torch.rand(2, 4), 0.0, 0.0)
        with pytest.raises(ValueError, match="beta_u"):
            CF.em_routing(torch.randn(2, 5, 3, 16), torch.rand(2, 5), torch.zeros(4), 0.0)
        with pytest.raises(ValueError, match="one lambda per iteration"):
            CF.em_routing(torch.randn(2, 5, 3, 16), torch.rand(2, 5), 0.0, 0.0, 3, [1.0])
        with pytest.raises(TypeError):
            CF.em_routing(torch.randn(2, 5, 3, 16), torch.ones(2, 5, dtype=torch.long), 0.0, 0.0)


# --------------------------------------------------------------------------- conv EM routing


class TestConvEMRouting:
    @pytest.mark.parametrize(
        "in_size,k,stride,n_types,n_out",
        [((4, 4), 3, 1, 2, 3), ((5, 4), 3, 2, 1, 2), ((3, 5), 2, 1, 2, 2)],
    )
    def test_matches_loops(self, in_size, k, stride, n_types, n_out):
        h, w = in_size
        g = torch.Generator().manual_seed(h * w + k)
        # Votes are per (parent position, slot): a child votes differently for different
        # parent positions only through its kernel offset, which is what gathering gives.
        child_votes = torch.randn(1, h, w, n_types, n_out, 4, generator=g, dtype=DT)
        child_acts = torch.rand(1, h, w, n_types, generator=g, dtype=DT)
        votes = gather_children(child_votes, k, stride)
        acts = gather_children(child_acts, k, stride)
        votes = votes + 0.1 * torch.randn(votes.shape, generator=g, dtype=DT)
        beta_u, beta_a = rand(n_out, seed=7, scale=0.3), rand(n_out, seed=8, scale=0.3)
        lambdas = [0.1, 0.2, 0.3]
        poses, out_a, R = CF.conv_em_routing(
            votes,
            acts,
            beta_u,
            beta_a,
            in_size=in_size,
            kernel_size=k,
            stride=stride,
            iterations=3,
            inverse_temperatures=lambdas,
        )
        rp, ra, rR = ref_conv_em_routing(
            votes[0], acts[0], beta_u, beta_a, in_size, k, stride, lambdas
        )
        torch.testing.assert_close(poses[0], rp)
        torch.testing.assert_close(out_a[0], ra)
        torch.testing.assert_close(R[0], rR)

    def test_each_child_sums_to_one_over_all_its_parents(self):
        h, w, k, s, n_types, n_out = 6, 5, 3, 1, 2, 3
        votes = gather_children(rand(2, h, w, n_types, n_out, 16), k, s)
        acts = gather_children(torch.rand(2, h, w, n_types, dtype=DT), k, s)
        _, _, R = CF.conv_em_routing(
            votes, acts, 0.0, 0.0, in_size=(h, w), kernel_size=k, stride=s, iterations=3
        )
        idx = CF.conv_children_index((h, w), k, s)
        child = (idx[:, :, None] * n_types + torch.arange(n_types)).reshape(-1)
        per_slot = R.sum(-1).reshape(2, -1)
        totals = torch.zeros(2, h * w * n_types, dtype=DT).index_add_(1, child, per_slot)
        torch.testing.assert_close(totals, torch.ones_like(totals))

    def test_one_position_equals_em_routing(self):
        """With a single parent position every child feeds only it: same as em_routing."""
        votes, acts = rand(2, 1, 18, 3, 16), torch.rand(2, 1, 18, dtype=DT)
        a = CF.conv_em_routing(
            votes,
            acts,
            0.1,
            0.2,
            in_size=(3, 3),
            kernel_size=3,
            stride=1,
            iterations=3,
            inverse_temperatures=[0.1, 0.2, 0.3],
        )
        b = CF.em_routing(votes, acts, 0.1, 0.2, 3, [0.1, 0.2, 0.3])
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)

    def test_gradcheck(self):
        votes = gather_children(rand(1, 3, 3, 1, 2, 4, scale=0.5), 2, 1).requires_grad_()
        acts = gather_children(torch.rand(1, 3, 3, 1, dtype=DT) * 0.8 + 0.1, 2, 1)
        acts.requires_grad_()

        def fn(v, a):
            return CF.conv_em_routing(
                v,
                a,
                0.1,
                0.1,
                in_size=(3, 3),
                kernel_size=2,
                stride=1,
                iterations=3,
                inverse_temperatures=[0.1, 0.2, 0.3],
            )

        assert torch.autograd.gradcheck(fn, (votes, acts))

    def test_degenerate_inputs_finite(self):
        votes = torch.zeros(2, 4, 18, 3, 16, dtype=DT, requires_grad=True)
        acts = torch.zeros(2, 4, 18, dtype=DT, requires_grad=True)
        outs = CF.conv_em_routing(votes, acts, 0.0, 0.0, in_size=(4, 4), kernel_size=3, stride=1)
        (outs[0].sum() + outs[1].sum()).backward()
        for t in (*outs, votes.grad, acts.grad):
            assert torch.isfinite(t).all()

    def test_wrong_geometry_is_an_error(self):
        with pytest.raises(ValueError, match="parent positions"):
            CF.conv_em_routing(
                torch.randn(1, 5, 18, 3, 16),
                torch.rand(1, 5, 18),
                0.0,
                0.0,
                in_size=(4, 4),
                kernel_size=3,
                stride=1,
            )
        with pytest.raises(ValueError, match="K\\*K\\*T"):
            CF.conv_em_routing(
                torch.randn(1, 4, 17, 3, 16),
                torch.rand(1, 4, 17),
                0.0,
                0.0,
                in_size=(4, 4),
                kernel_size=3,
                stride=1,
            )
