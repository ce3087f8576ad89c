"""capsnet.functional: margin, spread and reconstruction losses.

Checked against the float64 loops of loops.py (the equations of docs/spec.md).
"""

from __future__ import annotations

import pytest
import torch
from loops import DT, ref_margin, ref_spread

import capsnet.functional as CF


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
