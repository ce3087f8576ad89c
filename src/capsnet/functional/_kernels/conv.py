"""A convolutional matrix-capsule layer ([H18] §3): votes fused with EM routing.

The votes ``V = M W`` of each chunk of examples are computed, routed by
:func:`capsnet.functional._kernels.em.em_forward` and dropped; the backward pass
recomputes them. The vote tensor is never stored whole.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from capsnet.functional._kernels.common import no_autocast
from capsnet.functional._kernels.em import (
    EMConfig,
    cat_rows,
    em_backward,
    em_chunks,
    em_forward_chunked,
    saved_rows,
)


def _conv_capsule_chunk_votes(children: Tensor, w_mat: Tensor) -> tuple[Tensor, Tensor]:
    """Parent-major votes ``(g, O, I, 16)`` of ``children (g, I, 4, 4)``, ``w_mat (I, 4, O*4)``.

    One batched matmul per child slot over all (parent position, pose row) pairs of the
    chunk, then one copy into the routing layout. Also returns the slot-major children
    ``(I, g*4, 4)`` that the matmul used (the backward pass needs them).
    """
    g, i = children.shape[:2]
    o = w_mat.shape[-1] // 4
    rows = children.transpose(0, 1).reshape(i, g * 4, 4)  # (I, (g, x), y)
    products = torch.bmm(rows, w_mat)  # (I, (g, x), (o, z))
    votes = products.view(i, g, 4, o, 4).permute(1, 3, 0, 2, 4).reshape(g, o, i, 16)
    return votes, rows


def conv_capsules_forward(
    children: Tensor,
    act: Tensor,
    w_mat: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    config: EMConfig,
    keep_saved: bool = True,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Votes + :func:`em_forward`, chunk by chunk; returns ``mu``, ``logit``, saved tensors.

    ``keep_saved=False`` (no backward pass) keeps nothing of the chunks but the outputs.
    """
    with no_autocast(children):
        chunks = em_chunks(
            children.shape[0], _chunk_row_bytes(children, w_mat), config, children.device
        )
        mu, logit, _, saved = em_forward_chunked(
            lambda rows: _conv_capsule_chunk_votes(children[rows], w_mat)[0],
            chunks, act, beta_u, beta_a, keep_saved=keep_saved, keep_assign=False,
        )  # fmt: skip
    return mu, logit, saved


def _chunk_row_bytes(children: Tensor, w_mat: Tensor) -> int:
    """Bytes of votes per row (parent position) of a capsule convolution."""
    return children.shape[1] * w_mat.shape[-1] * 4 * children.element_size()


class ConvCapsulesEM(torch.autograd.Function):
    """Votes + EM routing of a capsule convolution, votes recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, children, act, w_mat, beta_u, beta_a, config: EMConfig):  # noqa: D102
        mu, logit, saved = conv_capsules_forward(children, act, w_mat, beta_u, beta_a, config)
        ctx.config = config
        ctx.save_for_backward(children, act, w_mat, beta_u, beta_a, *saved)
        ctx.set_materialize_grads(False)
        return mu, logit

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mu, grad_logit):  # noqa: D102
        children, act, w_mat, beta_u, beta_a, *saved = ctx.saved_tensors
        grad_mu, grad_logit = (None if x is None else x.contiguous() for x in (grad_mu, grad_logit))
        g, i = children.shape[:2]
        o = w_mat.shape[-1] // 4
        grad_children = torch.empty_like(children)
        grad_w = torch.zeros_like(w_mat)
        grads: list[list[Tensor]] = [[], [], []]
        with no_autocast(children):
            chunks = em_chunks(g, _chunk_row_bytes(children, w_mat), ctx.config, children.device)
            for rows, cfg in chunks:
                votes, slot_rows = _conv_capsule_chunk_votes(children[rows], w_mat)
                grad_votes, *rest = em_backward(
                    votes, act[rows], beta_u[rows], beta_a[rows], saved_rows(saved, rows, o), cfg,
                    None if grad_mu is None else grad_mu[rows],
                    None if grad_logit is None else grad_logit[rows],
                    None, out=votes,
                )  # fmt: skip
                for acc, x in zip(grads, rest, strict=True):
                    acc.append(x)
                # Back through V = M W: the slot-major layout of the forward products.
                n_rows = grad_votes.shape[0]
                grad_products = (
                    grad_votes.view(n_rows, o, i, 4, 4).permute(2, 0, 3, 1, 4)
                    .reshape(i, n_rows * 4, o * 4)
                )  # fmt: skip
                grad_w.baddbmm_(slot_rows.transpose(1, 2), grad_products)
                grad_rows = torch.bmm(grad_products, w_mat.transpose(1, 2))  # (I, (g, x), y)
                grad_children[rows] = grad_rows.view(i, n_rows, 4, 4).transpose(0, 1)
        grad_act, grad_bu, grad_ba = (cat_rows(x) for x in grads)
        return grad_children, grad_act, grad_w, grad_bu, grad_ba, None
