"""Capsule layers as ``nn.Module`` s; the math lives in :mod:`capsnet.functional`.

Vector capsules ([S17], dynamic routing; :mod:`.vector`): :class:`PrimaryCapsules`,
:class:`DenseCapsules`, :class:`CapsuleDecoder`. Matrix capsules ([H18], EM routing;
:mod:`.matrix`): :class:`PrimaryMatrixCapsules`, :class:`ConvMatrixCapsules`,
:class:`ClassMatrixCapsules`. Capsule layouts and shared checks: :mod:`.layouts`. Routing
hooks (look at votes and assignments without changing results): :mod:`.hooks`.

Letters used in shapes: ``B`` batch, ``C`` image/feature channels, ``H x W`` a spatial grid,
``T`` capsule types per position, ``I`` input capsules, ``O`` output capsules, ``D`` pose
size (8 or 16 for vectors, 16 for flattened 4x4 matrices), ``K`` kernel size, ``P`` parent
positions of a convolutional capsule layer. Example: Sabour's PrimaryCapsules turn a
``(128, 256, 20, 20)`` feature map into ``(128, 1152, 8)`` capsules (``6*6*32 = 1152``).

Constructors take their first size positionally and the rest by keyword
(``ConvMatrixCapsules(32, out_types=32, kernel_size=3, stride=2)``); passing the rest by
position, and the old ``CapsuleDecoder(num_caps=, caps_dim=)`` names, still work for one
release with a ``DeprecationWarning``.

References:
    [S17] Sabour, Frosst, Hinton. Dynamic Routing Between Capsules. NeurIPS 2017.
    [H18] Hinton, Sabour, Frosst. Matrix Capsules with EM Routing. ICLR 2018.
    [G19] Gritzman. Avoiding Implementation Pitfalls of "Matrix Capsules with EM Routing".
"""

from capsnet.layers.hooks import RoutingCall, RoutingLayer
from capsnet.layers.layouts import (
    capsule_lengths,
    capsules_from_feature_map,
    conv_output_size,
    flatten_capsules,
    unfold_capsules,
)
from capsnet.layers.matrix import (
    DEFAULT_EM_VARIANT,
    EM_LAYER_VARIANTS,
    ROUTING_MODES,
    ClassMatrixCapsules,
    ConvMatrixCapsules,
    EMLayerVariant,
    PrimaryMatrixCapsules,
    authors_inverse_temperatures,
)
from capsnet.layers.vector import CapsuleDecoder, DenseCapsules, PrimaryCapsules

__all__ = [
    "capsules_from_feature_map",
    "flatten_capsules",
    "unfold_capsules",
    "conv_output_size",
    "capsule_lengths",
    "authors_inverse_temperatures",
    "DEFAULT_EM_VARIANT",
    "EM_LAYER_VARIANTS",
    "EMLayerVariant",
    "PrimaryCapsules",
    "DenseCapsules",
    "CapsuleDecoder",
    "PrimaryMatrixCapsules",
    "ConvMatrixCapsules",
    "ClassMatrixCapsules",
    "ROUTING_MODES",
    "RoutingCall",
    "RoutingLayer",
]
