"""Straightforward reference implementations, for side-by-side timing.

This is the obvious tensor code that popular PyTorch capsule implementations use, written
from the papers' equations (docs/spec.md §1-2), computing *the same function* as capsnet's
models so every benchmark figure can be given as a ratio measured in one process:

* inputs are unfolded by stacking shifted slices, poses are tiled once per output type and
  the transformation matrices once per example and position (``repeat``), and every vote
  is materialised by a batched 4x4 (or 16x8) matmul;
* routing is :mod:`capsnet.functional.reference`, the plain form of the equations that the
  tests also hold the kernels against: it loops over iterations with broadcast tensor
  expressions in the ``(B, I, O, D)`` layout and autograd records every intermediate.

The reference models copy the parameters of a capsnet model (``from_model``), so outputs can
be checked against capsnet's (``benchmarks/run.py --smoke`` does) and both train
independently.

Letters: B batch, I input capsules, O output capsules, D pose size, K kernel size,
T capsule types per position, P parent positions.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsnet.functional import default_inverse_temperatures, squash
from capsnet.functional import reference as REF

# --------------------------------------------------------------------------- routing


def dynamic_routing(u_hat: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """[S17] Procedure 1 on ``u_hat (B, I, O, D)``; returns ``v (B, O, D)``, ``c (B, I, O)``."""
    return REF.dynamic_routing(u_hat, iterations)


def em_routing(votes, a, beta_u, beta_a, lambdas, var_floor=1e-6, eps=1e-8, normalize=False):
    """[H18] Procedure 1 per group: ``votes (B, I, O, D)``, ``a (B, I)``."""
    return REF.em_routing(
        votes, a, beta_u, beta_a, lambdas, normalize_cost=normalize, var_floor=var_floor, eps=eps
    )


def conv_em_routing(
    votes, a, beta_u, beta_a, lambdas, in_size, k, stride, var_floor=1e-6, eps=1e-8, normalize=False
):
    """Convolutional EM routing, each child normalised over all parents it feeds ([G19]).

    ``votes (N, P, K*K*T, O, D)``, ``a (N, P, K*K*T)``.
    """
    return REF.conv_em_routing(
        votes, a, beta_u, beta_a, lambdas, in_size=in_size, kernel_size=k, stride=stride,
        normalize_cost=normalize, var_floor=var_floor, eps=eps,
    )  # fmt: skip


# --------------------------------------------------------------------------- Sabour CapsNet


class RefCapsNet(nn.Module):
    """Sabour et al. CapsNet the straightforward way (copies a ``capsnet`` model's weights)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        m = copy.deepcopy(model)
        self.conv1, self.primary_conv = m.conv1, m.primary.conv
        self.primary_types, self.primary_dim = m.primary.out_types, m.primary.pose_dim
        self.W = nn.Parameter(m.digits.weight.detach().clone())  # (I, O, 16, 8)
        self.iterations = m.digits.iterations
        self.decoder = m.decoder.net if m.decoder is not None else None
        self.image_shape = (m.in_channels, *m.input_size)

    def forward(self, x: Tensor, targets: Tensor | None = None):
        h = torch.relu(self.conv1(x))
        f = self.primary_conv(h)  # (B, T*8, 6, 6)
        bsz, _, hh, ww = f.shape
        u = f.view(bsz, self.primary_types, self.primary_dim, hh, ww).permute(0, 3, 4, 1, 2)
        u = squash(u.reshape(bsz, -1, self.primary_dim))  # (B, I, 8)
        n_out = self.W.shape[1]
        u_tiled = u[:, :, None, :, None].repeat(1, 1, n_out, 1, 1)  # (B, I, O, 8, 1)
        w_tiled = self.W[None].repeat(bsz, 1, 1, 1, 1)  # (B, I, O, 16, 8)
        u_hat = torch.matmul(w_tiled, u_tiled).squeeze(-1)  # (B, I, O, 16)
        v, _ = dynamic_routing(u_hat, self.iterations)
        lengths = (v * v).sum(-1).add(1e-9).sqrt()
        recon = None
        if self.decoder is not None:
            idx = targets if targets is not None else lengths.detach().argmax(-1)
            mask = F.one_hot(idx, n_out).to(v.dtype)
            recon = self.decoder((v * mask[..., None]).flatten(1)).view(bsz, *self.image_shape)
        return lengths, v, recon


# --------------------------------------------------------------------------- matrix capsules


def _patches(grid: Tensor, k: int, stride: int) -> Tensor:
    """(B, H, W, T, ...) -> (B, Ho, Wo, K*K, T, ...) by stacking K*K shifted strided slices."""
    h, w = grid.shape[1:3]
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    slices = [
        grid[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
        for i in range(k)
        for j in range(k)
    ]
    return torch.stack(slices, dim=3)


class RefConvCaps(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        kk, t_in, t_out = layer.weight.shape[:3]
        self.k, self.stride, self.t_in, self.t_out = layer.kernel_size, layer.stride, t_in, t_out
        self.W = nn.Parameter(layer.weight.detach().clone().reshape(kk * t_in, t_out, 4, 4))
        self.beta_u = nn.Parameter(layer.beta_u.detach().clone())
        self.beta_a = nn.Parameter(layer.beta_a.detach().clone())
        self.lambdas = layer.inverse_temperatures or default_inverse_temperatures(layer.iterations)
        self.faithful = layer.routing == "faithful"
        self.normalize = layer.normalize_cost

    def forward(self, poses: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        bsz, h, w = poses.shape[:3]
        pp = _patches(poses, self.k, self.stride)  # (B, Ho, Wo, KK, T, 16)
        pa = _patches(act, self.k, self.stride)  # (B, Ho, Wo, KK, T)
        ho, wo = pp.shape[1:3]
        s = self.k * self.k * self.t_in
        m = pp.reshape(bsz * ho * wo, s, 1, 4, 4).repeat(1, 1, self.t_out, 1, 1)
        w_tiled = self.W[None].repeat(bsz * ho * wo, 1, 1, 1, 1)  # (B*P, S, O, 4, 4)
        votes = torch.matmul(m, w_tiled).reshape(bsz, ho * wo, s, self.t_out, 16)
        a = pa.reshape(bsz, ho * wo, s)
        if self.faithful:
            mu, out_a, _ = conv_em_routing(
                votes,
                a,
                self.beta_u,
                self.beta_a,
                self.lambdas,
                (h, w),
                self.k,
                self.stride,
                normalize=self.normalize,
            )
        else:
            mu, out_a, _ = em_routing(
                votes.reshape(bsz * ho * wo, s, self.t_out, 16),
                a.reshape(bsz * ho * wo, s),
                self.beta_u,
                self.beta_a,
                self.lambdas,
                normalize=self.normalize,
            )
        return mu.reshape(bsz, ho, wo, self.t_out, 16), out_a.reshape(bsz, ho, wo, self.t_out)


class RefClassCaps(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.W = nn.Parameter(layer.weight.detach().clone())  # (T, E, 4, 4)
        self.beta_u = nn.Parameter(layer.beta_u.detach().clone())
        self.beta_a = nn.Parameter(layer.beta_a.detach().clone())
        self.lambdas = layer.inverse_temperatures or default_inverse_temperatures(layer.iterations)
        self.coordinates = layer.coordinate_addition
        self.normalize = layer.normalize_cost

    def forward(self, poses: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        bsz, h, w, t_in = poses.shape[:4]
        n_cls = self.W.shape[1]
        m = poses.reshape(bsz, h * w * t_in, 1, 4, 4).repeat(1, 1, n_cls, 1, 1)
        w_tiled = self.W[None, None].repeat(bsz, h * w, 1, 1, 1, 1).reshape(bsz, -1, n_cls, 4, 4)
        votes = torch.matmul(m, w_tiled).reshape(bsz, h * w * t_in, n_cls, 16)
        if self.coordinates:
            rows = (torch.arange(h, dtype=votes.dtype, device=votes.device) + 0.5) / h
            cols = (torch.arange(w, dtype=votes.dtype, device=votes.device) + 0.5) / w
            coord = torch.zeros(h, w, t_in, 16, dtype=votes.dtype, device=votes.device)
            coord[..., 0] = rows[:, None, None]
            coord[..., 1] = cols[None, :, None]
            votes = votes + coord.reshape(1, h * w * t_in, 1, 16)
        mu, out_a, _ = em_routing(
            votes,
            act.reshape(bsz, -1),
            self.beta_u,
            self.beta_a,
            self.lambdas,
            normalize=self.normalize,
        )
        return mu, out_a


class RefMatrixCapsNet(nn.Module):
    """Hinton et al. matrix capsule network the straightforward way (copies the weights)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        m = copy.deepcopy(model)
        self.conv1, self.pose_conv, self.act_conv = m.conv1, m.primary.pose, m.primary.activation
        self.caps1, self.caps2 = RefConvCaps(m.conv_caps1), RefConvCaps(m.conv_caps2)
        self.class_caps = RefClassCaps(m.class_caps)

    def forward(self, x: Tensor, targets: Tensor | None = None):
        h = torch.relu(self.conv1(x))
        pose = self.pose_conv(h)  # (B, T*16, H, W)
        bsz, _, hh, ww = pose.shape
        poses = pose.view(bsz, -1, 16, hh, ww).permute(0, 3, 4, 1, 2)  # (B, H, W, T, 16)
        act = torch.sigmoid(self.act_conv(h)).permute(0, 2, 3, 1)  # (B, H, W, T)
        poses, act = self.caps1(poses, act)
        poses, act = self.caps2(poses, act)
        mu, out_a = self.class_caps(poses, act)
        return out_a, mu, None


def from_model(model: nn.Module) -> nn.Module:
    """The straightforward reference of a capsnet ``CapsNet`` or ``MatrixCapsNet``."""
    name = type(model).__name__
    if name == "CapsNet":
        return RefCapsNet(model)
    if name == "MatrixCapsNet":
        return RefMatrixCapsNet(model)
    raise TypeError(f"no reference implementation for {name}")
