"""Dynamic routing ([S17] Procedure 1) on parent-major predictions, hand-written backward."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from capsnet.functional._common import compute_dtype
from capsnet.functional._kernels.common import (
    matvec,
    needs_grad,
    no_autocast,
    parent_major,
    squash_backward,
)
from capsnet.functional.squash import squash


def _dynamic_routing_forward(
    u: Tensor, iterations: int
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """[S17] Procedure 1 on parent-major predictions ``u (G, O, I, D)``, no autograd.

    Returns ``v (G, O, D)``, ``c (G, O, I)`` and the per-iteration couplings, sums ``s``
    and outputs ``v`` (what the backward pass needs).
    """
    g, o, i, d = u.shape
    uf = u.view(g * o, i, d)
    logits = u.new_zeros(g, o, i)  # b_ij
    cs, ss, vs = [], [], []
    for t in range(iterations):
        c = torch.softmax(logits, dim=1)  # c_i = softmax_j(b_i), over parents (dim 1)
        s = torch.bmm(c.view(g * o, 1, i), uf).view(g, o, d)  # s_j = sum_i c_ij u_j|i
        v = squash(s)
        cs.append(c)
        ss.append(s)
        vs.append(v)
        if t < iterations - 1:
            logits += matvec(uf, v.view(g * o, d)).view(g, o, i)  # b_ij += u_j|i . v_j
    return v, c, cs, ss, vs


class _DynamicRouting(torch.autograd.Function):
    """Dynamic routing with a hand-written backward pass (see the section comment)."""

    @staticmethod
    def forward(ctx, u: Tensor, iterations: int, detach_inner: bool):  # noqa: D102
        with no_autocast(u):
            v, c, cs, ss, vs = _dynamic_routing_forward(u, iterations)
        ctx.iterations, ctx.detach_inner = iterations, detach_inner
        ctx.save_for_backward(u, *cs, *ss, *vs[:-1])
        ctx.set_materialize_grads(False)
        return v, c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v: Tensor | None, grad_c: Tensor | None):  # noqa: D102
        saved = ctx.saved_tensors  # unpacked once (activation checkpointing requires it)
        with no_autocast(saved[0]):
            return _DynamicRouting._backward(ctx, saved, grad_v, grad_c)

    @staticmethod
    def _backward(ctx, saved: tuple[Tensor, ...], grad_v: Tensor | None, grad_c: Tensor | None):
        grad_v = None if grad_v is None else grad_v.contiguous()
        grad_c = None if grad_c is None else grad_c.contiguous()
        r = ctx.iterations
        u, cs, ss, vs = saved[0], saved[1 : r + 1], saved[r + 1 : 2 * r + 1], saved[2 * r + 1 :]
        g, o, i, d = u.shape
        uf = u.view(g * o, i, d)
        if grad_v is None:
            grad_v = u.new_zeros(g, o, d)
        if ctx.detach_inner:
            # Only the last weighted sum s = sum_i c_ij u_j|i sees u; c is a constant.
            grad_s = squash_backward(ss[-1], grad_v)
            grad_u = torch.bmm(cs[-1].view(g * o, i, 1), grad_s.view(g * o, 1, d))
            return grad_u.view(g, o, i, d), None, None
        # d/du of sum_t [c^t . s^t-terms] + sum_t [a^t-terms]: collect the rank-one factors
        # (c^t (x) grad s^t and grad a^t (x) v^t) and form grad_u once at the end.
        left: list[Tensor] = []
        right: list[Tensor] = []
        grad_b: Tensor | None = None  # gradient w.r.t. the logits b^{t+1}
        for t in reversed(range(r)):
            if t == r - 1:
                grad_vt = grad_v
            else:
                # b^{t+1} = b^t + a^t with a^t_ji = u_j|i . v^t_j
                assert grad_b is not None  # set by iteration t + 1
                left.append(grad_b)
                right.append(vs[t])
                grad_vt = torch.bmm(grad_b.view(g * o, 1, i), uf).view(g, o, d)
            grad_s = squash_backward(ss[t], grad_vt)  # v^t = squash(s^t)
            left.append(cs[t])  # s^t_j = sum_i c^t_ij u_j|i
            right.append(grad_s)
            if t == 0:
                break  # b^1 = 0 is a constant
            grad_ct = matvec(uf, grad_s.view(g * o, d)).view(g, o, i)
            if t == r - 1 and grad_c is not None:
                grad_ct = grad_ct + grad_c
            c = cs[t]  # c^t = softmax over parents of b^t
            grad_soft = c * (grad_ct - (grad_ct * c).sum(dim=1, keepdim=True))
            grad_b = grad_soft if grad_b is None else grad_b + grad_soft
        a = torch.stack(left, dim=-1).view(g * o, i, len(left))
        b = torch.stack(right, dim=-2).view(g * o, len(right), d)
        return torch.bmm(a, b).view(g, o, i, d), None, None


def dynamic_routing_kernel(
    u_hat: Tensor, iterations: int, detach_inner: bool
) -> tuple[Tensor, Tensor]:
    batch_shape, (in_caps, out_caps, dim) = u_hat.shape[:-3], u_hat.shape[-3:]
    u = parent_major(u_hat, compute_dtype(u_hat))  # (G, O, I, D)
    if needs_grad(u):
        v, c = _DynamicRouting.apply(u, iterations, detach_inner)
    else:
        with no_autocast(u):
            v, c = _dynamic_routing_forward(u, iterations)[:2]
    v = v.reshape(*batch_shape, out_caps, dim).to(u_hat.dtype)
    c = c.transpose(1, 2).reshape(*batch_shape, in_caps, out_caps).to(u_hat.dtype)
    return v, c
