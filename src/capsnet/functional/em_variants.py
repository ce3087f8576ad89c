"""Named readings of EM routing ([H18] Procedure 1): the numeric choices each source makes.

[H18] leaves several numbers of EM routing open (the inverse temperature, how the biases
enter, the variance floor, how the data mass is normalised), and the two public
implementations that train fill them in differently. Each entry of :data:`EM_VARIANTS`
is one such reading, chosen by name with the ``variant`` argument of
:func:`capsnet.functional.em_routing`, :func:`~capsnet.functional.conv_em_routing`,
:func:`~capsnet.functional.conv_matrix_capsules`, the matrix-capsule layers and
``matrix_capsnet``. Adding a variant is adding one entry. docs/em_variants.md gives the
table of choices with the file and function of the source of each.

The M-step of every variant computes, for parent j of a group with ``I`` children and
``O`` parents (``D`` pose entries, ``s_j = sum_i R'_ij`` the data mass)::

    mean_j   = sum_i R'_ij V_ij / (s_j + eps)
    mu_j     = (1 - mean_momentum) mean_j + mean_momentum mu_j(previous iteration)
               (mu_j(before the first iteration) = 0)
    var_j^h  = sum_i R'_ij (V_ij^h - mu_j^h)^2 / (s_j + eps) + var_floor
    cost_j   = mass_factor * s_j * (beta_u_scale * D * beta_u + log_var_scale * sum_h log var_j^h)
    a_j      = logistic(lambda * (beta_a_scale * beta_a - cost_j))

with ``mass_factor = mass_scale * O / I`` (1 when ``mass_scale`` is None). ``paper`` is
:func:`~capsnet.functional.em_routing` as [H18] writes it (``cost^h = (beta_u + log
sigma^h) s_j``, so ``beta_u_scale = 1``, ``log_var_scale = 1/2``).

The layer-level choices of a variant (the inverse temperature of each layer, the
initialisation of ``W``, ``beta_u`` and ``beta_a``) are in
:data:`capsnet.layers.matrix.EM_LAYER_VARIANTS`, under the same names.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

__all__ = ["EMVariant", "EM_VARIANTS", "CONV_NORMALIZATIONS", "resolve_em_variant"]

#: How a convolutional layer's E-step normalises a child's assignments over the parents
#: at several positions: over all of them, of every type ("all_parents", [G19] pitfall 1),
#: or over the positions separately for each parent type ("per_type", the official code).
CONV_NORMALIZATIONS = ("all_parents", "per_type")


class EMVariant(NamedTuple):
    """The numeric choices of one reading of EM routing (see the module docstring).

    Attributes:
        name: the registry name.
        beta_a_scale: factor of ``beta_a`` in the activation logit.
        beta_u_scale: factor of ``D * beta_u`` in the cost.
        log_var_scale: factor of ``sum_h log var^h`` in the cost (1/2: ``log sigma``).
        mass_scale: ``None``, or the data-mass normalisation: the cost is multiplied by
            ``mass_scale * O / I`` ([G19]'s ``100 / (children / parents)``).
        mean_momentum: share of the previous iteration's mean in ``mu`` (0: none).
        var_floor: added to every variance.
        eps: added to the data mass in divisions.
        conv_normalization: one of :data:`CONV_NORMALIZATIONS`; also fixes the initial
            assignments of a convolutional layer (1 / all parents of the child, or 1 / O).
        final_lambda: ``None``: the functions' schedule is linear, 1 -> min(r, 3)
            (:func:`capsnet.functional.default_inverse_temperatures`); else
            ``final_lambda * (1 - 0.95 ** t)``, t = 1..r.
        source: the source, in a few words (details in docs/em_variants.md).
    """

    name: str
    beta_a_scale: float = 1.0
    beta_u_scale: float = 1.0
    log_var_scale: float = 0.5
    mass_scale: float | None = None
    mean_momentum: float = 0.0
    var_floor: float = 1e-6
    eps: float = 1e-8
    conv_normalization: str = "all_parents"
    final_lambda: float | None = None
    source: str = ""


#: The official code's numbers (see the "official" entry below for their sources).
_OFFICIAL: dict[str, Any] = {
    "beta_a_scale": -5000.0,
    "beta_u_scale": 1.0 + math.log(2.0 * math.pi),
    "log_var_scale": 1.0,
    "mean_momentum": 0.1,
    "var_floor": 5e-4,
    "eps": 1e-7,
    "conv_normalization": "per_type",
    "final_lambda": 0.01,
}

EM_VARIANTS: dict[str, EMVariant] = {
    # [H18] §3 and Procedure 1 as written; the numbers the paper leaves open are capsnet's
    # earlier choices (variance floor 1e-6, eps 1e-8, lambda 1 -> 3 in the functions).
    "paper": EMVariant(name="paper", source="Hinton et al. 2018, Procedure 1"),
    # google-research/google-research capsule_em/em_layers.py, update_em_routing and
    # update_conv_routing: logit = beta * (win - activation_biases * 5000) with
    # win = masses * (-sum_h log variance - sigma_biases * 16 * (log 2pi + 1)); the
    # centre is 0.9 * mean + 0.1 * previous centre; variance + min_var (0.0005, default of
    # conv_capsule_mat / connector_capsule_mat); masses + 1e-7; the conv posterior is
    # normalised over positions per (input type, output type) and starts at 1 / O.
    "official": EMVariant(
        name="official", source="google-research capsule_em, em_layers.py", **_OFFICIAL
    ),
    # The official code's routing maths (as "official"); its layers (lambda per layer) too,
    # but capsnet's initialisation: see capsnet.layers.matrix.EM_LAYER_VARIANTS["capsnet"].
    "capsnet": EMVariant(
        name="capsnet", source="the official routing maths; capsnet's initialisation", **_OFFICIAL
    ),
    # IBM/matrix-capsules-with-em-routing em_routing.py, m_step: cost_j_h = (beta_v +
    # 0.5 log var_j) * rr_prime_sum * layer_norm_factor, layer_norm_factor =
    # 100 / (child_caps / parent_caps); var_j + 1e-9; FLAGS.epsilon = 1e-9; e_step /
    # utils.softmax_across_parents and utils.init_rr: every parent of the child.
    "gritzman": EMVariant(
        name="gritzman",
        mass_scale=100.0,
        var_floor=1e-9,
        eps=1e-9,
        final_lambda=0.01,
        source="Gritzman 2019, IBM matrix-capsules-with-em-routing, em_routing.py",
    ),
}


def resolve_em_variant(variant: str | EMVariant) -> EMVariant:
    """The :class:`EMVariant` named ``variant`` (an :class:`EMVariant` passes through)."""
    if isinstance(variant, EMVariant):
        if variant.conv_normalization not in CONV_NORMALIZATIONS:
            raise ValueError(
                f"conv_normalization must be one of {CONV_NORMALIZATIONS}, "
                f"got {variant.conv_normalization!r}"
            )
        return variant
    if not isinstance(variant, str) or variant not in EM_VARIANTS:
        raise ValueError(f"variant must be one of {tuple(EM_VARIANTS)}, got {variant!r}")
    return EM_VARIANTS[variant]
