"""capsnet.functional: the fused convolutional matrix-capsule layer and chunked routing.

Checked against the float64 loops of loops.py (the equations of docs/spec.md).
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
from capsnet.functional._kernels import em as EM_KERNEL


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
        two_step = CF.reference.conv_matrix_capsules(
            *inputs, kw["inverse_temperatures"], kernel_size=3, stride=1, routing=routing
        )
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
        with pytest.raises(ValueError, match=r"\(N, H, W, T, 16\)"):
            CF.conv_matrix_capsules(poses[..., :8], acts, weight, 0.0, 0.0, **kw)
        with pytest.raises(ValueError, match="activations must have shape"):
            CF.conv_matrix_capsules(poses, acts[..., :1], weight, 0.0, 0.0, **kw)
        with pytest.raises(ValueError, match=r"weight must have shape \(K\*K, T, O, 4, 4\)"):
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
            monkeypatch.setattr(EM_KERNEL, "EM_CHUNK_BYTES", chunk_bytes)
            v, a = votes.clone().requires_grad_(), acts.clone().requires_grad_()
            out = fn(v, a)
            (out[0].sum() + out[1].square().sum() + out[2].square().sum()).backward()
            results.append((*out, v.grad, a.grad))
        for x, y in zip(*results, strict=True):
            torch.testing.assert_close(x, y)


# --------------------------------------------------------------------------- losses
