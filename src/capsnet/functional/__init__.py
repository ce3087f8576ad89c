"""Capsule math as pure functions: squash, routing, losses, coordinate addition.

Everything here is stateless: tensors in, tensors out, weights passed as arguments.
:mod:`capsnet.layers` wraps these in ``nn.Module`` s.

Where things are (one idea per file):

* :mod:`~capsnet.functional.algorithms`: routing algorithms by name (the registry the
  layers choose from; adding one = one function + ``@register_routing``).
* :mod:`~capsnet.functional.routing`: the public routing functions
  (:func:`dynamic_routing`, :func:`em_routing`, :func:`conv_em_routing`), their checks and
  the one inverse-temperature schedule resolver.
* :mod:`~capsnet.functional.em_variants`: the named readings of EM routing (``"paper"``,
  ``"official"``, ``"gritzman"``) that the ``variant`` argument of the EM functions selects.
* :mod:`~capsnet.functional.reference`: the same equations written plainly with autograd,
  the file to read beside the papers; tests and benchmarks compare the kernels with it.
* :mod:`capsnet.functional._kernels`: the fast kernels that run. The EM M-step and E-step
  that train are ``m_step`` and ``e_step`` in ``functional/_kernels/em.py``.
* :mod:`~capsnet.functional.conv`: convolutional matrix-capsule layers (votes + routing);
  :mod:`~capsnet.functional.geometry`: which children each parent position reads.
* :mod:`~capsnet.functional.squash`, :mod:`~capsnet.functional.losses`,
  :mod:`~capsnet.functional.coordinates`.

Letters used in shapes (defined once, used everywhere):

* ``B`` batch, ``I`` input (child) capsules, ``O`` output (parent) capsules,
  ``D`` pose size (16 for a 4x4 pose matrix or Sabour's class capsules, 8 for primary
  vector capsules), ``P`` parent positions of a convolutional capsule layer,
  ``K`` kernel size, ``T`` child capsule types per position, ``H x W`` a capsule grid.
  (``N`` is used for the batch where a convolutional layer's ``N x P`` parent groups
  form the routing batch.)
* ``...`` any number of leading batch dimensions.

Concrete example: Sabour's MNIST CapsNet routes ``u_hat`` of shape ``(128, 1152, 10, 16)``
(batch 128, 6*6*32 primary capsules, 10 digit capsules of 16D).

References:
    [S17] Sabour, Frosst, Hinton. Dynamic Routing Between Capsules. NeurIPS 2017.
    [H18] Hinton, Sabour, Frosst. Matrix Capsules with EM Routing. ICLR 2018.
    [G19] Gritzman. Avoiding Implementation Pitfalls of "Matrix Capsules with EM Routing".
    docs/spec.md sections hold the equations, architectures and numbers cited.
"""

from capsnet.functional import reference
from capsnet.functional.algorithms import (
    RoutingResult,
    get_routing,
    list_routings,
    register_routing,
)
from capsnet.functional.conv import ROUTING_MODES, conv_capsule_votes, conv_matrix_capsules
from capsnet.functional.coordinates import coordinate_addition
from capsnet.functional.em_variants import EM_VARIANTS, EMVariant, resolve_em_variant
from capsnet.functional.geometry import conv_children_index
from capsnet.functional.losses import margin_loss, reconstruction_loss, spread_loss, spread_margin
from capsnet.functional.routing import (
    authors_inverse_temperatures,
    conv_em_routing,
    default_inverse_temperatures,
    dynamic_routing,
    em_routing,
    resolve_inverse_temperatures,
)
from capsnet.functional.squash import squash

__all__ = [
    "squash",
    "dynamic_routing",
    "em_routing",
    "conv_em_routing",
    "conv_children_index",
    "conv_capsule_votes",
    "conv_matrix_capsules",
    "default_inverse_temperatures",
    "authors_inverse_temperatures",
    "resolve_inverse_temperatures",
    "margin_loss",
    "spread_loss",
    "spread_margin",
    "reconstruction_loss",
    "coordinate_addition",
    "ROUTING_MODES",
    "EM_VARIANTS",
    "EMVariant",
    "resolve_em_variant",
    "reference",
    "RoutingResult",
    "register_routing",
    "get_routing",
    "list_routings",
]
