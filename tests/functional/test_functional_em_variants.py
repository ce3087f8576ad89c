"""EM routing variants (capsnet.functional.em_variants): kernels == reference == loops.

The loops of loops.py transcribe each source's M-step (the paper's Procedure 1, the
official code's update_em_routing / update_conv_routing, IBM's m_step) with its own
constants, so these tests also check the registry's numbers.
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
    ref_conv_votes,
    ref_em_routing,
)

import capsnet.functional as CF
from capsnet.functional import reference as REF
from capsnet.functional.em_variants import EM_VARIANTS, EMVariant, resolve_em_variant

VARIANTS = list(EM_VARIANTS)
#: Inverse temperatures and a beta_a scale that keep each variant's activations in (0, 1).
LAMBDAS = {
    "paper": [0.01, 0.02, 0.03],
    "official": [0.01, 0.02, 0.03],
    "gritzman": [5e-4, 1e-3, 1.5e-3],
    "capsnet": [0.01, 0.02, 0.03],
}
BETA_A = {"paper": 0.5, "official": 1e-3, "gritzman": 50.0, "capsnet": 1e-3}


def _inputs(batch, n_in, n_out, dim, variant, seed=3):
    votes = rand(*batch, n_in, n_out, dim, seed=seed, scale=0.5)
    acts = torch.rand(*batch, n_in, generator=torch.Generator().manual_seed(seed), dtype=DT)
    beta_u = rand(n_out, seed=seed + 1, scale=0.3)
    beta_a = rand(n_out, seed=seed + 2) * BETA_A[variant]
    return votes, acts, beta_u, beta_a


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _grads(outputs, inputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(total, inputs)


def _conv_inputs(h, w, k, stride, types, n_out, variant, n=1, seed=11):
    g = torch.Generator().manual_seed(seed)
    child_votes = torch.randn(n, h, w, types, n_out, 4, generator=g, dtype=DT)
    votes = gather_children(child_votes, k, stride)
    votes = votes + 0.1 * torch.randn(votes.shape, generator=g, dtype=DT)
    acts = gather_children(torch.rand(n, h, w, types, generator=g, dtype=DT), k, stride)
    beta_u = rand(n_out, seed=seed + 1, scale=0.3)
    beta_a = rand(n_out, seed=seed + 2) * BETA_A[variant]
    return votes, acts, beta_u, beta_a


class TestRegistry:
    def test_names_and_errors(self):
        assert set(EM_VARIANTS) == {"paper", "official", "gritzman", "capsnet"}
        # capsnet shares the official routing maths; only its layers differ
        assert EM_VARIANTS["capsnet"]._replace(name="official", source="") == EM_VARIANTS[
            "official"
        ]._replace(source="")
        assert resolve_em_variant("official") is EM_VARIANTS["official"]
        custom = EMVariant("mine", beta_a_scale=2.0)
        assert resolve_em_variant(custom) is custom
        with pytest.raises(ValueError, match="variant must be one of"):
            resolve_em_variant("offical")
        with pytest.raises(ValueError, match="variant must be one of"):
            CF.em_routing(rand(1, 4, 2, 4), torch.rand(1, 4, dtype=DT), 0.0, 0.0, variant="x")
        with pytest.raises(ValueError, match="conv_normalization"):
            resolve_em_variant(EMVariant("bad", conv_normalization="rows"))

    def test_schedules(self):
        assert CF.resolve_inverse_temperatures(3, None) == [1.0, 2.0, 3.0]
        for name in ("official", "gritzman"):
            lambdas = CF.resolve_inverse_temperatures(3, None, name)
            torch.testing.assert_close(
                torch.tensor(lambdas), torch.tensor([0.0005, 0.000975, 0.00142625])
            )
        assert CF.resolve_inverse_temperatures(2, [0.1, 0.2], "official") == [0.1, 0.2]

    def test_variants_differ(self):
        votes, acts, beta_u, beta_a = _inputs((2,), 9, 4, 16, "paper")
        outs = {
            v: CF.em_routing(
                votes, acts, beta_u, beta_a * BETA_A[v], 3, LAMBDAS["paper"], variant=v
            )
            for v in VARIANTS
        }
        for v in ("official", "gritzman"):
            assert not torch.allclose(outs[v][1], outs["paper"][1])
        assert not torch.allclose(outs["official"][0], outs["paper"][0])  # damped means


@pytest.mark.parametrize("variant", VARIANTS)
class TestEMVariants:
    @pytest.mark.parametrize(
        "batch,n_in,n_out,dim,iterations", [((2,), 9, 4, 16, 3), ((1, 2), 5, 3, 4, 2)]
    )
    def test_matches_loops(self, variant, batch, n_in, n_out, dim, iterations):
        votes, acts, beta_u, beta_a = _inputs(batch, n_in, n_out, dim, variant)
        lambdas = LAMBDAS[variant][:iterations]
        poses, out_a, R = CF.em_routing(
            votes, acts, beta_u, beta_a, iterations, lambdas, variant=variant
        )
        assert ((out_a > 1e-3) & (out_a < 1 - 1e-3)).any()  # not all saturated
        fv, fa = votes.reshape(-1, n_in, n_out, dim), acts.reshape(-1, n_in)
        fp, foa = poses.reshape(-1, n_out, dim), out_a.reshape(-1, n_out)
        fr = R.reshape(-1, n_in, n_out)
        for n in range(fv.shape[0]):
            rp, ra, rr = ref_em_routing(fv[n], fa[n], beta_u, beta_a, lambdas, variant=variant)
            torch.testing.assert_close(fp[n], rp)
            torch.testing.assert_close(foa[n], ra)
            torch.testing.assert_close(fr[n], rr)

    @pytest.mark.parametrize("normalize", [False, True])
    def test_kernel_equals_reference(self, variant, normalize):
        inputs = _inputs((2,), 9, 4, 16, variant)
        a, b = _leaves(*inputs), _leaves(*inputs)
        lambdas = LAMBDAS[variant]
        fast = CF.em_routing(*a, 3, lambdas, variant=variant, normalize_cost=normalize)
        ref = REF.em_routing(*b, lambdas, normalize_cost=normalize, variant=variant)
        for x, y in zip(fast, ref, strict=True):
            torch.testing.assert_close(x, y)
        for x, y in zip(_grads(fast, a), _grads(ref, b), strict=True):
            torch.testing.assert_close(x, y)

    def test_gradcheck(self, variant):
        votes, acts, beta_u, beta_a = _inputs((1,), 5, 3, 4, variant)
        acts = acts * 0.8 + 0.1
        leaves = _leaves(votes, acts, beta_u, beta_a)

        def fn(v, a, bu, ba):
            return CF.em_routing(v, a, bu, ba, 3, LAMBDAS[variant], variant=variant)

        assert torch.autograd.gradcheck(fn, leaves)

    @pytest.mark.parametrize("in_size,k,stride", [((4, 4), 3, 1), ((5, 4), 3, 2)])
    def test_conv_matches_loops_and_reference(self, variant, in_size, k, stride):
        h, w = in_size
        inputs = _conv_inputs(h, w, k, stride, 2, 3, variant)
        geo = {"in_size": in_size, "kernel_size": k, "stride": stride}
        lambdas = LAMBDAS[variant]
        a, b = _leaves(*inputs), _leaves(*inputs)
        fast = CF.conv_em_routing(
            *a, iterations=3, inverse_temperatures=lambdas, variant=variant, **geo
        )
        ref = REF.conv_em_routing(*b, lambdas, variant=variant, **geo)
        for x, y in zip(fast, ref, strict=True):
            torch.testing.assert_close(x, y)
        for x, y in zip(_grads(fast, a), _grads(ref, b), strict=True):
            torch.testing.assert_close(x, y)
        loops = ref_conv_em_routing(
            inputs[0][0], inputs[1][0], inputs[2], inputs[3], in_size, k, stride, lambdas,
            variant=variant,
        )  # fmt: skip
        for x, y in zip(fast, loops, strict=True):
            torch.testing.assert_close(x[0], y)

    def test_conv_gradcheck(self, variant):
        votes, acts, beta_u, beta_a = _conv_inputs(3, 3, 2, 1, 1, 2, variant, seed=5)
        leaves = _leaves(votes, acts * 0.8 + 0.1, beta_u, beta_a)

        def fn(v, a, bu, ba):
            return CF.conv_em_routing(
                v, a, bu, ba, in_size=(3, 3), kernel_size=2, stride=1, iterations=3,
                inverse_temperatures=LAMBDAS[variant], variant=variant,
            )  # fmt: skip

        assert torch.autograd.gradcheck(fn, leaves)

    @pytest.mark.parametrize("routing", ["faithful", "per_position"])
    def test_fused_layer_matches_loops(self, chunking, variant, routing):
        h = w = 5
        k, stride, b, n_out = 3, 1, 2, 3
        poses, acts, weight, beta_u, beta_a = conv_capsule_inputs(2, h, w, b, n_out, k, seed=2)
        beta_a = beta_a * BETA_A[variant]
        lambdas = LAMBDAS[variant]
        leaves = _leaves(poses, acts, weight, beta_u, beta_a)
        fused = CF.conv_matrix_capsules(
            *leaves, kernel_size=k, stride=stride, iterations=3, inverse_temperatures=lambdas,
            routing=routing, variant=variant,
        )  # fmt: skip
        two_step = REF.conv_matrix_capsules(
            *leaves, lambdas, kernel_size=k, stride=stride, routing=routing, variant=variant
        )
        for x, y in zip(fused, two_step, strict=True):
            torch.testing.assert_close(x, y)
        for x, y in zip(_grads(fused, leaves), _grads(two_step, leaves), strict=True):
            torch.testing.assert_close(x, y)
        votes = ref_conv_votes(poses, weight, k, stride)
        child_acts = gather_children(acts, k, stride)
        for e in range(2):
            if routing == "faithful":
                rp, ra, _ = ref_conv_em_routing(
                    votes[e], child_acts[e], beta_u, beta_a, (h, w), k, stride, lambdas,
                    variant=variant,
                )  # fmt: skip
            else:
                per_pos = [
                    ref_em_routing(
                        votes[e, p], child_acts[e, p], beta_u, beta_a, lambdas, variant=variant
                    )
                    for p in range(votes.shape[1])
                ]
                rp = torch.stack([r[0] for r in per_pos])
                ra = torch.stack([r[1] for r in per_pos])
            torch.testing.assert_close(fused[0][e].reshape(-1, n_out, 16), rp)
            torch.testing.assert_close(fused[1][e].reshape(-1, n_out), ra)

    @pytest.mark.parametrize("case", ["zero_acts", "identical", "single_child", "huge", "tiny"])
    def test_degenerate_inputs_finite(self, variant, case):
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
        elif case == "tiny":
            votes = votes * 1e-6
        for dtype in (DT, torch.float32):
            v = votes.detach().to(dtype).requires_grad_()
            a = acts.detach().to(dtype).requires_grad_()
            bu = torch.zeros(4, dtype=dtype, requires_grad=True)
            ba = torch.zeros(4, dtype=dtype, requires_grad=True)
            outs = CF.em_routing(v, a, bu, ba, 3, variant=variant)
            sum(o.sum() for o in outs[:2]).backward()
            for t in (*outs, v.grad, a.grad, bu.grad, ba.grad):
                assert torch.isfinite(t).all(), (case, dtype)

    @pytest.mark.parametrize("case", ["zeros", "identical", "huge"])
    def test_degenerate_conv_and_bfloat16_autocast_finite(self, variant, case):
        poses, acts, weight, beta_u, beta_a = conv_capsule_inputs(2, 5, 5, 2, 3, 3, seed=1)
        if case == "zeros":
            poses, acts = torch.zeros_like(poses), torch.zeros_like(acts)
        elif case == "identical":
            poses = poses[:, :1, :1].expand_as(poses).clone()
        elif case == "huge":
            poses = poses * 1e3
        leaves = [x.float().requires_grad_() for x in (poses, acts, weight, beta_u, beta_a)]
        for routing in ("faithful", "per_position"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                p = leaves[0] @ torch.eye(16)  # a bf16 tensor under autocast, as a layer's
                outs = CF.conv_matrix_capsules(
                    p, *leaves[1:], kernel_size=3, stride=1, iterations=3, routing=routing,
                    variant=variant,
                )  # fmt: skip
            sum(o.float().sum() for o in outs).backward()
            for t in (*outs, *(x.grad for x in leaves)):
                assert torch.isfinite(t).all(), (case, routing)

    def test_em_routing_bfloat16_autocast(self, variant):
        x = torch.randn(2, 10, 16)
        w = torch.randn(16, 3 * 16, requires_grad=True)
        acts = torch.rand(2, 10)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            votes = (x @ w).reshape(2, 10, 3, 16)
            outs = CF.em_routing(votes, acts, torch.zeros(3), torch.zeros(3), 3, variant=variant)
        outs[0].float().sum().backward()
        assert all(torch.isfinite(o).all() for o in outs)
        assert torch.isfinite(w.grad).all()


class TestPerTypeNormalisation:
    def test_official_sums_to_one_per_type_over_positions(self):
        h, w, k, s, n_types, n_out = 6, 5, 3, 1, 2, 3
        votes = gather_children(rand(2, h, w, n_types, n_out, 16), k, s)
        acts = gather_children(torch.rand(2, h, w, n_types, dtype=DT), k, s)
        _, _, R = CF.conv_em_routing(
            votes, acts, 0.0, 0.0, in_size=(h, w), kernel_size=k, stride=s, iterations=3,
            variant="official",
        )  # fmt: skip
        idx = CF.conv_children_index((h, w), k, s)
        child = (idx[:, :, None] * n_types + torch.arange(n_types)).reshape(-1)
        for j in range(n_out):
            per_slot = R[..., j].reshape(2, -1)
            totals = torch.zeros(2, h * w * n_types, dtype=DT).index_add_(1, child, per_slot)
            torch.testing.assert_close(totals, torch.ones_like(totals))

    def test_gritzman_and_paper_sum_to_one_over_all_parents(self):
        h, w, k, s, n_types, n_out = 5, 5, 3, 2, 2, 3
        votes = gather_children(rand(2, h, w, n_types, n_out, 16), k, s)
        acts = gather_children(torch.rand(2, h, w, n_types, dtype=DT), k, s)
        idx = CF.conv_children_index((h, w), k, s)
        child = (idx[:, :, None] * n_types + torch.arange(n_types)).reshape(-1)
        for variant in ("paper", "gritzman"):
            _, _, R = CF.conv_em_routing(
                votes, acts, 0.0, 0.0, in_size=(h, w), kernel_size=k, stride=s, iterations=2,
                variant=variant,
            )  # fmt: skip
            totals = torch.zeros(2, h * w * n_types, dtype=DT)
            totals.index_add_(1, child, R.sum(-1).reshape(2, -1))
            torch.testing.assert_close(totals, torch.ones_like(totals))
