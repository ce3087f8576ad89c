"""The papers' equations written out as plain loops in float64: the tests' ground truth.

Every function here is a direct transcription of an equation of [S17] or [H18]
(docs/spec.md §1-2), with Python loops over children, parents and pose entries where the
equation has sums, so that a reader can check it against the paper line by line. The fast
kernels and :mod:`capsnet.functional.reference` are both tested against these.
"""

from __future__ import annotations

import math

import torch

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


def ref_m_step(
    votes, a, R, beta_u, beta_a, lam, var_floor, eps, normalize_cost, variant="paper", prev=None
):
    """The M-step of one variant, as its source writes it (docs/em_variants.md).

    ``prev``: the previous iteration's means (the official code's damped centre).
    """
    n_in, n_out, dim = votes.shape
    mus, variances, costs = [], [], []
    for j in range(n_out):
        rp = [R[i][j] * float(a[i]) for i in range(n_in)]
        total = sum(rp)
        mu = sum(rp[i] * votes[i, j] for i in range(n_in)) / (total + eps)
        if variant == "official":
            # em_layers.update_em_routing: center = .9 * mean + .1 * center (0 at first)
            mu = 0.9 * mu + 0.1 * (prev[j] if prev is not None else 0.0)
        var = sum(rp[i] * (votes[i, j] - mu) ** 2 for i in range(n_in)) / (total + eps)
        var = var + var_floor
        if variant == "official":
            # win = masses * (p_i - sigma_biases * num_out_atoms * (log_2pi + 1.0)),
            # p_i = -sum_h log variance; logit = beta * (win - activation_biases * 5000).
            # Departure (docs/em_variants.md): the mass here has no + eps.
            p_i = -sum(math.log(float(var[h])) for h in range(dim))
            win = total * (p_i - float(beta_u[j]) * dim * (math.log(2 * math.pi) + 1.0))
            cost = -win
        elif variant == "gritzman":
            # m_step: cost_j_h = (beta_v + 0.5 log var_j) * rr_prime_sum * layer_norm_factor,
            # layer_norm_factor = 100 / (child_caps / parent_caps)
            layer_norm_factor = 100.0 / (n_in / n_out)
            cost = sum(
                (float(beta_u[j]) + 0.5 * math.log(float(var[h]))) * total * layer_norm_factor
                for h in range(dim)
            )
        else:
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
    scale = -5000.0 if variant == "official" else 1.0
    logits = [lam * (scale * float(beta_a[j]) - costs[j]) for j in range(n_out)]
    acts = [1.0 / (1.0 + math.exp(-x)) for x in logits]
    return mus, variances, acts


#: var_floor, eps of each variant's source (paper: capsnet's choice).
FLOORS = {"paper": (1e-6, 1e-8), "official": (5e-4, 1e-7), "gritzman": (1e-9, 1e-9)}
#: Variants that share another's routing maths (they differ only in their layers).
FORMS = {"capsnet": "official"}


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
    votes, a, beta_u, beta_a, lambdas, normalize_cost=False, var_floor=None, eps=None,
    variant="paper",
):  # fmt: skip
    """[H18] Procedure 1 for one group, loops over i, j, h. votes: (I, O, D), a: (I,)."""
    variant = FORMS.get(variant, variant)
    var_floor = FLOORS[variant][0] if var_floor is None else var_floor
    eps = FLOORS[variant][1] if eps is None else eps
    n_in, n_out, _ = votes.shape
    R = [[1.0 / n_out] * n_out for _ in range(n_in)]
    mus = None
    for t, lam in enumerate(lambdas):
        mus, variances, acts = ref_m_step(
            votes, a, R, beta_u, beta_a, lam, var_floor, eps, normalize_cost, variant, mus
        )
        if t < len(lambdas) - 1:
            R = ref_e_step(votes, mus, variances, acts)
    return torch.stack(mus), torch.tensor(acts, dtype=DT), torch.tensor(R, dtype=DT)


def ref_conv_em_routing(votes, acts, beta_u, beta_a, in_size, k, stride, lambdas, variant="paper"):
    """Convolutional EM with each child normalised over all parents that contain it.

    Written as one big routing problem over explicit (child -> parent) edges, with loops.
    votes: (P, K*K*B, O, D) for one example; children ordered (kh, kw, b). With
    ``variant="official"`` (em_layers.update_conv_routing) a child is normalised over the
    parent positions of each parent type separately and starts from R = 1 / O.
    """
    variant = FORMS.get(variant, variant)
    var_floor, eps = FLOORS[variant]
    per_type = variant == "official"
    h_in, w_in = in_size
    w_out = (w_in - k) // stride + 1
    n_pos, n_slots, n_out, dim = votes.shape
    n_types = n_slots // (k * k)

    def child_of(p, s):
        ho, wo = divmod(p, w_out)
        kk, b = divmod(s, n_types)
        kh, kw = divmod(kk, k)
        return ((ho * stride + kh) * w_in + (wo * stride + kw), b)

    def group(p, s, j):  # the parents a child's assignments are normalised over
        return (child_of(p, s), j) if per_type else child_of(p, s)

    fan = {}
    for p in range(n_pos):
        for s in range(n_slots):
            fan[child_of(p, s)] = fan.get(child_of(p, s), 0) + n_out
    if per_type:
        R = [[[1.0 / n_out] * n_out for s in range(n_slots)] for p in range(n_pos)]
    else:
        R = [[[1.0 / fan[child_of(p, s)]] * n_out for s in range(n_slots)] for p in range(n_pos)]
    prev = [None] * n_pos
    for t, lam in enumerate(lambdas):
        per_pos = [
            ref_m_step(
                votes[p], acts[p], R[p], beta_u, beta_a, lam, var_floor, eps, False, variant,
                prev[p],
            )
            for p in range(n_pos)
        ]  # fmt: skip
        prev = [pp[0] for pp in per_pos]
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
        for (p, s, j), value in logits.items():
            totals.setdefault(group(p, s, j), []).append(value)
        norm = {
            c: max(v) + math.log(sum(math.exp(x - max(v)) for x in v)) for c, v in totals.items()
        }
        R = [
            [
                [math.exp(logits[(p, s, j)] - norm[group(p, s, j)]) for j in range(n_out)]
                for s in range(n_slots)
            ]
            for p in range(n_pos)
        ]
    mus = torch.stack([torch.stack(pp[0]) for pp in per_pos])
    acts_out = torch.tensor([pp[2] for pp in per_pos], dtype=DT)
    return mus, acts_out, torch.tensor(R, dtype=DT)


# --------------------------------------------------------------------------- squash


def gather_children(grid, k, stride):
    """(N, H, W, B, ...) child tensor -> (N, P, K*K*B, ...) as conv_em_routing expects."""
    n, h, w, b = grid.shape[:4]
    h_out, w_out = (h - k) // stride + 1, (w - k) // stride + 1
    fields = []
    for r in range(h_out):  # parent positions, row-major
        for c in range(w_out):
            children = [
                grid[:, r * stride + kh, c * stride + kw, t]
                for kh in range(k)
                for kw in range(k)
                for t in range(b)
            ]  # order (kh, kw, t)
            fields.append(torch.stack(children, dim=1))
    return torch.stack(fields, dim=1)  # (N, P, K*K*B, ...)


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
