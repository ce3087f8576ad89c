"""capsnet.functional against the papers' equations written out as plain loops (float64)."""

from __future__ import annotations

import math

import pytest
import torch

import capsnet.functional as CF

DT = torch.float64


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale


# --------------------------------------------------------------------------- references


def ref_squash(s):
    """[S17] eq. (1) for one vector, with 0 -> 0."""
    n2 = float((s * s).sum())
    if n2 == 0.0:
        return torch.zeros_like(s)
    return (n2 / (1.0 + n2)) * s / math.sqrt(n2)


def ref_dynamic_routing(u_hat, iterations):
    """[S17] Procedure 1 for one example, loops over i and j. u_hat: (I, O, D)."""
    n_in, n_out, _ = u_hat.shape
    b = [[0.0] * n_out for _ in range(n_in)]
    for it in range(iterations):
        c = []
        for i in range(n_in):
            m = max(b[i])
            e = [math.exp(b[i][j] - m) for j in range(n_out)]
            c.append([x / sum(e) for x in e])
        v = []
        for j in range(n_out):
            s = sum(c[i][j] * u_hat[i, j] for i in range(n_in))
            v.append(ref_squash(s))
        if it < iterations - 1:
            for i in range(n_in):
                for j in range(n_out):
                    b[i][j] += float(u_hat[i, j] @ v[j])
    return torch.stack(v), torch.tensor(c, dtype=u_hat.dtype)


def ref_m_step(votes, a, R, beta_u, beta_a, lam, var_floor, eps, normalize_cost):
    n_in, n_out, dim = votes.shape
    mus, variances, costs = [], [], []
    for j in range(n_out):
        rp = [R[i][j] * float(a[i]) for i in range(n_in)]
        total = sum(rp)
        mu = sum(rp[i] * votes[i, j] for i in range(n_in)) / (total + eps)
        var = sum(rp[i] * (votes[i, j] - mu) ** 2 for i in range(n_in)) / (total + eps)
        var = var + var_floor
        cost = sum(
            (float(beta_u[j]) + math.log(math.sqrt(float(var[h])))) * total for h in range(dim)
        )
        mus.append(mu)
        variances.append(var)
        costs.append(cost)
    if normalize_cost:
        mean = sum(costs) / n_out
        std = math.sqrt(sum((c - mean) ** 2 for c in costs) / n_out + eps)
        costs = [(c - mean) / std for c in costs]
    acts = [1.0 / (1.0 + math.exp(-lam * (float(beta_a[j]) - costs[j]))) for j in range(n_out)]
    return mus, variances, acts


def ref_e_step(votes, mus, variances, acts):
    n_in, n_out, dim = votes.shape
    R = []
    for i in range(n_in):
        logs = []
        for j in range(n_out):
            logp = 0.0
            for h in range(dim):
                var = float(variances[j][h])
                diff = float(votes[i, j, h] - mus[j][h])
                logp += -diff * diff / (2 * var) - 0.5 * math.log(2 * math.pi * var)
            logs.append(math.log(acts[j]) + logp)
        m = max(logs)
        e = [math.exp(x - m) for x in logs]
        R.append([x / sum(e) for x in e])
    return R


def ref_em_routing(
    votes, a, beta_u, beta_a, lambdas, normalize_cost=False, var_floor=1e-6, eps=1e-8
):
    """[H18] Procedure 1 for one group, loops over i, j, h. votes: (I, O, D), a: (I,)."""
    n_in, n_out, _ = votes.shape
    R = [[1.0 / n_out] * n_out for _ in range(n_in)]
    for t, lam in enumerate(lambdas):
        mus, variances, acts = ref_m_step(
            votes, a, R, beta_u, beta_a, lam, var_floor, eps, normalize_cost
        )
        if t < len(lambdas) - 1:
            R = ref_e_step(votes, mus, variances, acts)
    return torch.stack(mus), torch.tensor(acts, dtype=DT), torch.tensor(R, dtype=DT)


# --------------------------------------------------------------------------- squash


class TestSquash:
    def test_matches_equation(self):
        s = rand(5, 7, 8)
        out = CF.squash(s, eps=0.0)
        for idx in [(0, 0), (3, 4), (4, 6)]:
            torch.testing.assert_close(out[idx], ref_squash(s[idx]))

    def test_dim_argument(self):
        s = rand(3, 8, 5)
        torch.testing.assert_close(
            CF.squash(s, dim=1), CF.squash(s.transpose(1, 2)).transpose(1, 2)
        )

    @pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
    def test_direction_kept_length_below_one(self, scale):
        s = rand(100, 16, scale=scale)
        out = CF.squash(s)
        length = out.norm(dim=-1)
        assert (length < 1).all() and (length > 0).all()
        cos = torch.nn.functional.cosine_similarity(out, s, dim=-1)
        torch.testing.assert_close(cos, torch.ones_like(cos))

    def test_zero_maps_to_zero_with_finite_gradient(self):
        s = torch.zeros(4, 8, dtype=DT, requires_grad=True)
        out = CF.squash(s)
        assert (out == 0).all()
        out.sum().backward()
        assert torch.isfinite(s.grad).all()

    def test_gradcheck(self):
        s = rand(3, 4).requires_grad_()
        assert torch.autograd.gradcheck(CF.squash, (s,))

    def test_bfloat16_input(self):
        out = CF.squash(rand(4, 8, scale=100).to(torch.bfloat16))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()

    def test_rejects_integer_input(self):
        with pytest.raises(TypeError, match="floating-point"):
            CF.squash(torch.ones(3, 4, dtype=torch.long))


# --------------------------------------------------------------------------- dynamic routing


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


def ref_conv_em_routing(votes, acts, beta_u, beta_a, in_size, k, stride, lambdas):
    """Convolutional EM with each child normalised over all parents that contain it.

    Written as one big routing problem over explicit (child -> parent) edges, with loops.
    votes: (P, K*K*B, O, D) for one example; children ordered (kh, kw, b).
    """
    h_in, w_in = in_size
    w_out = (w_in - k) // stride + 1
    n_pos, n_slots, n_out, dim = votes.shape
    n_types = n_slots // (k * k)

    def child_of(p, s):
        ho, wo = divmod(p, w_out)
        kk, b = divmod(s, n_types)
        kh, kw = divmod(kk, k)
        return ((ho * stride + kh) * w_in + (wo * stride + kw), b)

    fan = {}
    for p in range(n_pos):
        for s in range(n_slots):
            fan[child_of(p, s)] = fan.get(child_of(p, s), 0) + n_out
    R = [[[1.0 / fan[child_of(p, s)]] * n_out for s in range(n_slots)] for p in range(n_pos)]
    for t, lam in enumerate(lambdas):
        per_pos = [
            ref_m_step(votes[p], acts[p], R[p], beta_u, beta_a, lam, 1e-6, 1e-8, False)
            for p in range(n_pos)
        ]
        if t == len(lambdas) - 1:
            break
        logits = {}
        for p in range(n_pos):
            mus, variances, a_out = per_pos[p]
            for s in range(n_slots):
                for j in range(n_out):
                    logp = math.log(a_out[j])
                    for h in range(dim):
                        var = float(variances[j][h])
                        diff = float(votes[p, s, j, h] - mus[j][h])
                        logp += -diff * diff / (2 * var) - 0.5 * math.log(2 * math.pi * var)
                    logits[(p, s, j)] = logp
        totals = {}
        for (p, s, _j), value in logits.items():
            totals.setdefault(child_of(p, s), []).append(value)
        norm = {
            c: max(v) + math.log(sum(math.exp(x - max(v)) for x in v)) for c, v in totals.items()
        }
        R = [
            [
                [math.exp(logits[(p, s, j)] - norm[child_of(p, s)]) for j in range(n_out)]
                for s in range(n_slots)
            ]
            for p in range(n_pos)
        ]
    mus = torch.stack([torch.stack(pp[0]) for pp in per_pos])
    acts_out = torch.tensor([pp[2] for pp in per_pos], dtype=DT)
    return mus, acts_out, torch.tensor(R, dtype=DT)


def gather_children(grid, k, stride):
    """(N, H, W, B, ...) child tensor -> (N, P, K*K*B, ...) as conv_em_routing expects."""
    n, h, w, b = grid.shape[:4]
    idx = CF.conv_children_index((h, w), k, stride)  # (P, KK)
    flat = grid.reshape(n, h * w, b, *grid.shape[4:])
    return flat[:, idx].reshape(n, idx.shape[0], idx.shape[1] * b, *grid.shape[4:])


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
        with pytest.raises(ValueError, match="K\\*K\\*B"):
            CF.conv_em_routing(
                torch.randn(1, 4, 17, 3, 16),
                torch.rand(1, 4, 17),
                0.0,
                0.0,
                in_size=(4, 4),
                kernel_size=3,
                stride=1,
            )


def ref_conv_votes(poses, weight, k, stride):
    """Votes by loops over parent positions, kernel offsets and types: V = M W."""
    n, h, w, b, _ = poses.shape
    n_out = weight.shape[2]
    h_out, w_out = (h - k) // stride + 1, (w - k) // stride + 1
    votes = torch.zeros(n, h_out * w_out, k * k * b, n_out, 16, dtype=poses.dtype)
    for e in range(n):
        for r in range(h_out):
            for c in range(w_out):
                for kh in range(k):
                    for kw in range(k):
                        for t in range(b):
                            m = poses[e, r * stride + kh, c * stride + kw, t].reshape(4, 4)
                            for j in range(n_out):
                                v = m @ weight[kh * k + kw, t, j]
                                votes[e, r * w_out + c, (kh * k + kw) * b + t, j] = v.reshape(16)
    return votes


def conv_capsule_inputs(n, h, w, b, n_out, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    poses = torch.randn(n, h, w, b, 16, generator=g, dtype=DT)
    acts = torch.rand(n, h, w, b, generator=g, dtype=DT)
    weight = torch.eye(4, dtype=DT) + 0.3 * torch.randn(
        k * k, b, n_out, 4, 4, generator=g, dtype=DT
    )
    beta_u = 0.3 * torch.randn(n_out, generator=g, dtype=DT)
    beta_a = 0.3 * torch.randn(n_out, generator=g, dtype=DT)
    return poses, acts, weight, beta_u, beta_a


@pytest.fixture(params=["one chunk", "many chunks"])
def chunking(request, monkeypatch):
    """Route in one chunk, or in the smallest chunks (one example each) on the CPU."""
    if request.param == "many chunks":
        monkeypatch.setattr(CF, "_EM_CHUNK_BYTES", 1)
    else:
        monkeypatch.setattr(CF, "_EM_CHUNK_BYTES", 1 << 40)
    return request.param


class TestConvMatrixCapsules:
    """conv_capsule_votes and the fused conv_matrix_capsules (votes never stored)."""

    def test_votes_match_loops(self):
        poses, acts, weight, _, _ = conv_capsule_inputs(2, 5, 4, 2, 3, 3)
        votes, child_acts = CF.conv_capsule_votes(poses, acts, weight, 3, 2)
        torch.testing.assert_close(votes, ref_conv_votes(poses, weight, 3, 2))
        torch.testing.assert_close(child_acts, gather_children(acts, 3, 2))

    @pytest.mark.parametrize("routing", ["faithful", "per_position"])
    @pytest.mark.parametrize("in_size,k,stride", [((5, 5), 3, 1), ((6, 5), 3, 2), ((3, 4), 2, 1)])
    def test_matches_loops(self, chunking, routing, in_size, k, stride):
        h, w = in_size
        b, n_out, lambdas = 2, 3, [0.1, 0.2, 0.3]
        poses, acts, weight, beta_u, beta_a = conv_capsule_inputs(2, h, w, b, n_out, k, seed=h)
        out_poses, out_acts = CF.conv_matrix_capsules(
            poses, acts, weight, beta_u, beta_a, kernel_size=k, stride=stride, iterations=3,
            inverse_temperatures=lambdas, routing=routing,
        )  # fmt: skip
        votes = ref_conv_votes(poses, weight, k, stride)
        child_acts = gather_children(acts, k, stride)
        h_out, w_out = (h - k) // stride + 1, (w - k) // stride + 1
        assert out_poses.shape == (2, h_out, w_out, n_out, 16)
        assert out_acts.shape == (2, h_out, w_out, n_out)
        for e in range(2):
            if routing == "faithful":
                rp, ra, _ = ref_conv_em_routing(
                    votes[e], child_acts[e], beta_u, beta_a, in_size, k, stride, lambdas
                )
            else:
                per_position = [
                    ref_em_routing(votes[e, p], child_acts[e, p], beta_u, beta_a, lambdas)
                    for p in range(votes.shape[1])
                ]
                rp = torch.stack([r[0] for r in per_position])
                ra = torch.stack([r[1] for r in per_position])
            torch.testing.assert_close(out_poses[e].reshape(-1, n_out, 16), rp)
            torch.testing.assert_close(out_acts[e].reshape(-1, n_out), ra)

    @pytest.mark.parametrize("routing", ["faithful", "per_position"])
    def test_gradients_match_two_step_form(self, chunking, routing):
        inputs = [x.requires_grad_() for x in conv_capsule_inputs(3, 5, 5, 2, 3, 3, seed=4)]
        kw = {"kernel_size": 3, "stride": 1, "inverse_temperatures": [0.5, 1.0, 1.5]}
        fused = CF.conv_matrix_capsules(*inputs, routing=routing, **kw)
        two_step = CF._conv_matrix_capsules_two_step(*inputs, routing=routing, **kw)
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(x.shape, generator=g, dtype=DT) for x in fused]
        grads = [
            torch.autograd.grad(
                sum((o * wt).sum() for o, wt in zip(out, weights, strict=True)), inputs
            )
            for out in (fused, two_step)
        ]
        for x, y in zip(fused + grads[0], two_step + grads[1], strict=True):
            torch.testing.assert_close(x, y)

    @pytest.mark.parametrize("routing", ["faithful", "per_position"])
    def test_gradcheck(self, chunking, routing):
        inputs = [x.requires_grad_() for x in conv_capsule_inputs(2, 4, 3, 1, 2, 2, seed=5)]

        def fn(*args):
            return CF.conv_matrix_capsules(
                *args, kernel_size=2, stride=1, iterations=3,
                inverse_temperatures=[0.2, 0.4, 0.6], routing=routing,
            )  # fmt: skip

        # fast_mode: a random projection of the Jacobian (the full check takes ~30 s here);
        # test_gradients_match_two_step_form compares every gradient entry as well.
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)

    @pytest.mark.parametrize("case", ["zeros", "large"])
    def test_degenerate_inputs_finite(self, case):
        poses, acts, weight, _, _ = conv_capsule_inputs(2, 4, 4, 2, 3, 3, seed=6)
        if case == "zeros":
            poses, acts = torch.zeros_like(poses), torch.zeros_like(acts)
        else:
            poses = poses * 1e4
        poses.requires_grad_()
        weight.requires_grad_()
        out = CF.conv_matrix_capsules(poses, acts, weight, 0.0, 0.0, kernel_size=3, stride=1)
        (out[0].sum() + out[1].sum()).backward()
        for t in (*out, poses.grad, weight.grad):
            assert torch.isfinite(t).all()

    def test_bf16_autocast_finite_and_close(self):
        poses, acts, weight, beta_u, beta_a = (
            x.float() for x in conv_capsule_inputs(2, 5, 5, 2, 3, 3, seed=7)
        )
        weight.requires_grad_()
        kw = {"kernel_size": 3, "stride": 1, "inverse_temperatures": [0.5, 1.0, 1.5]}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = CF.conv_matrix_capsules(poses.bfloat16(), acts, weight, beta_u, beta_a, **kw)
            out[1].sum().backward()
        ref = CF.conv_matrix_capsules(poses.bfloat16().float(), acts, weight, beta_u, beta_a, **kw)
        assert all(torch.isfinite(t).all() for t in (*out, weight.grad))
        torch.testing.assert_close(out[1].float(), ref[1], atol=2e-2, rtol=0)

    def test_bad_shapes_are_errors(self):
        poses, acts, weight, _, _ = conv_capsule_inputs(1, 4, 4, 2, 3, 3)
        kw = {"kernel_size": 3, "stride": 1}
        with pytest.raises(ValueError, match=r"\(N, H, W, B, 16\)"):
            CF.conv_matrix_capsules(poses[..., :8], acts, weight, 0.0, 0.0, **kw)
        with pytest.raises(ValueError, match="activations must have shape"):
            CF.conv_matrix_capsules(poses, acts[..., :1], weight, 0.0, 0.0, **kw)
        with pytest.raises(ValueError, match=r"weight must have shape \(K\*K, B, O, 4, 4\)"):
            CF.conv_matrix_capsules(poses, acts, weight[:4], 0.0, 0.0, **kw)
        with pytest.raises(ValueError, match="beta_u must be broadcastable"):
            CF.conv_matrix_capsules(poses, acts, weight, torch.zeros(2), 0.0, **kw)
        with pytest.raises(ValueError, match="routing must be one of"):
            CF.conv_matrix_capsules(poses, acts, weight, 0.0, 0.0, routing="fast", **kw)


class TestChunkedRouting:
    """Routing in cache-sized chunks of examples gives exactly the unchunked results."""

    @pytest.mark.parametrize("kind", ["em", "conv_em"])
    def test_chunks_do_not_change_results(self, monkeypatch, kind):
        if kind == "em":
            votes, acts = rand(5, 12, 3, 16, seed=2), torch.rand(5, 12, dtype=DT)

            def fn(v, a):
                return CF.em_routing(v, a, 0.1, 0.2, 3, [0.5, 1.0, 1.5])
        else:
            votes = gather_children(rand(3, 4, 4, 2, 3, 16, seed=3), 3, 1)
            acts = gather_children(torch.rand(3, 4, 4, 2, dtype=DT), 3, 1)

            def fn(v, a):
                return CF.conv_em_routing(
                    v, a, 0.1, 0.2, in_size=(4, 4), kernel_size=3, stride=1,
                    inverse_temperatures=[0.5, 1.0, 1.5],
                )  # fmt: skip

        results = []
        for chunk_bytes in (1 << 40, 1):
            monkeypatch.setattr(CF, "_EM_CHUNK_BYTES", chunk_bytes)
            v, a = votes.clone().requires_grad_(), acts.clone().requires_grad_()
            out = fn(v, a)
            (out[0].sum() + out[1].square().sum() + out[2].square().sum()).backward()
            results.append((*out, v.grad, a.grad))
        for x, y in zip(*results, strict=True):
            torch.testing.assert_close(x, y)


# --------------------------------------------------------------------------- losses


def ref_margin(lengths, targets, m_plus=0.9, m_minus=0.1, lam=0.5):
    total = 0.0
    for n in range(lengths.shape[0]):
        for k in range(lengths.shape[1]):
            v = float(lengths[n, k])
            t = 1.0 if int(targets[n]) == k else 0.0
            total += t * max(0.0, m_plus - v) ** 2 + lam * (1 - t) * max(0.0, v - m_minus) ** 2
    return total / lengths.shape[0]


def ref_spread(acts, targets, margin):
    total = 0.0
    for n in range(acts.shape[0]):
        t = int(targets[n])
        for i in range(acts.shape[1]):
            if i != t:
                total += max(0.0, margin - (float(acts[n, t]) - float(acts[n, i]))) ** 2
    return total / acts.shape[0]


class TestLosses:
    def test_margin_loss_matches_equation(self):
        lengths = torch.rand(6, 10, generator=torch.Generator().manual_seed(0), dtype=DT)
        targets = torch.tensor([0, 3, 9, 2, 2, 7])
        out = CF.margin_loss(lengths, targets)
        assert out.item() == pytest.approx(ref_margin(lengths, targets))
        kw = dict(m_plus=0.8, m_minus=0.2, lambda_=0.25)
        assert CF.margin_loss(lengths, targets, **kw).item() == pytest.approx(
            ref_margin(lengths, targets, 0.8, 0.2, 0.25)
        )

    def test_margin_loss_one_hot_and_multi_hot(self):
        lengths = torch.rand(4, 5, dtype=DT)
        targets = torch.tensor([1, 0, 4, 2])
        one_hot = torch.nn.functional.one_hot(targets, 5).to(DT)
        torch.testing.assert_close(
            CF.margin_loss(lengths, one_hot), CF.margin_loss(lengths, targets)
        )
        two = one_hot.clone()
        two[:, 3] = 1.0
        per = CF.margin_loss(lengths, two, reduction="none")
        expect = (
            two * (0.9 - lengths).clamp(min=0) ** 2
            + 0.5 * (1 - two) * (lengths - 0.1).clamp(min=0) ** 2
        ).sum(-1)
        torch.testing.assert_close(per, expect)

    def test_margin_loss_zero_when_perfect(self):
        lengths = torch.full((3, 4), 0.05, dtype=DT)
        lengths[torch.arange(3), torch.tensor([0, 1, 2])] = 0.95
        assert CF.margin_loss(lengths, torch.tensor([0, 1, 2])).item() == 0.0

    def test_spread_loss_matches_equation(self):
        acts = torch.rand(5, 6, generator=torch.Generator().manual_seed(1), dtype=DT)
        targets = torch.tensor([0, 5, 2, 2, 4])
        for m in (0.2, 0.5, 0.9):
            assert CF.spread_loss(acts, targets, m).item() == pytest.approx(
                ref_spread(acts, targets, m)
            )

    def test_spread_margin_schedule(self):
        assert CF.spread_margin(0) == pytest.approx(0.2)
        assert CF.spread_margin(3) == pytest.approx(0.5)
        assert CF.spread_margin(50) == pytest.approx(0.9)

    def test_reconstruction_loss(self):
        recon = torch.rand(3, 784, dtype=DT)
        images = torch.rand(3, 1, 28, 28, dtype=DT)
        expect = sum(float(((recon[n] - images[n].flatten()) ** 2).sum()) for n in range(3)) / 3
        assert CF.reconstruction_loss(recon, images).item() == pytest.approx(expect)
        assert CF.reconstruction_loss(recon, images, reduction="sum").item() == pytest.approx(
            expect * 3
        )

    def test_reductions(self):
        lengths, targets = torch.rand(4, 3, dtype=DT), torch.tensor([0, 1, 2, 0])
        none = CF.margin_loss(lengths, targets, reduction="none")
        assert none.shape == (4,)
        torch.testing.assert_close(CF.margin_loss(lengths, targets, reduction="sum"), none.sum())
        with pytest.raises(ValueError, match="reduction"):
            CF.margin_loss(lengths, targets, reduction="avg")

    def test_gradcheck_losses(self):
        lengths = torch.rand(3, 4, dtype=DT).requires_grad_()
        targets = torch.tensor([1, 0, 3])
        assert torch.autograd.gradcheck(lambda x: CF.margin_loss(x, targets), (lengths,))
        assert torch.autograd.gradcheck(lambda x: CF.spread_loss(x, targets, 0.6), (lengths,))
        recon = torch.rand(3, 8, dtype=DT).requires_grad_()
        images = torch.rand(3, 8, dtype=DT)
        assert torch.autograd.gradcheck(lambda r: CF.reconstruction_loss(r, images), (recon,))

    def test_target_errors(self):
        with pytest.raises(ValueError, match="targets must lie in"):
            CF.margin_loss(torch.rand(2, 3), torch.tensor([0, 3]))
        with pytest.raises(ValueError, match="shape"):
            CF.spread_loss(torch.rand(2, 3), torch.tensor([0, 1, 2]), 0.2)
        with pytest.raises(ValueError, match="same batch"):
            CF.reconstruction_loss(torch.rand(2, 10), torch.rand(2, 1, 3, 3))


# --------------------------------------------------------------------------- coordinates


class TestCoordinateAddition:
    @pytest.mark.parametrize("h,w,types", [(3, 3, 2), (4, 2, 1), (2, 5, 3)])
    def test_matches_convention(self, h, w, types):
        votes = rand(2, h * w * types, 4, 16)
        out = CF.coordinate_addition(votes, h, w)
        for row in range(h):
            for col in range(w):
                for b in range(types):
                    i = (row * w + col) * types + b
                    expect = votes[:, i].clone()
                    expect[..., 0] += (row + 0.5) / h
                    expect[..., 1] += (col + 0.5) / w
                    torch.testing.assert_close(out[:, i], expect)

    def test_right_hand_column_elements(self):
        """elements=(3, 7): the paper's 'first two elements of the right-hand column'."""
        votes = rand(1, 2 * 3, 2, 16)
        out = CF.coordinate_addition(votes, 2, 3, elements=(3, 7))
        delta = (out - votes).reshape(2, 3, 2, 4, 4)  # (row, col, out, 4x4)
        for row in range(2):
            for col in range(3):
                expect = torch.zeros(4, 4, dtype=DT)
                expect[0, 3], expect[1, 3] = (row + 0.5) / 2, (col + 0.5) / 3
                torch.testing.assert_close(delta[row, col, 1], expect)
        with pytest.raises(ValueError, match="two different indices"):
            CF.coordinate_addition(votes, 2, 3, elements=(3, 3))

    def test_rejects_bad_grid(self):
        with pytest.raises(ValueError, match="height\\*width\\*types"):
            CF.coordinate_addition(torch.randn(2, 10, 4, 16), 3, 3)
