"""capsnet.functional: coordinate addition, against the float64 loops of loops.py."""

from __future__ import annotations

import pytest
import torch
from loops import DT, rand

import capsnet.functional as CF


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
