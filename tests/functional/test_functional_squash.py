"""capsnet.functional: squash, against the float64 loops of loops.py."""

from __future__ import annotations

import pytest
import torch
from loops import DT, rand, ref_squash

import capsnet.functional as CF


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
