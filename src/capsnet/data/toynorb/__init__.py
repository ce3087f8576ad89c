"""ToyNORB: smallNORB's structure and protocol on procedurally built, rendered toys.

* :mod:`~capsnet.data.toynorb.shapes`: primitive meshes (boxes, cylinders, cones,
  ellipsoids, spheres).
* :mod:`~capsnet.data.toynorb.objects`: the 5 categories x 10 instances.
* :mod:`~capsnet.data.toynorb.render`: camera, z-buffered rasteriser, shading.
* :mod:`~capsnet.data.toynorb.generate`: rendering to smallNORB-format files.
* :mod:`~capsnet.data.toynorb.dataset`: the registered ``toynorb`` dataset.

See ``docs/data.md`` (ToyNORB).
"""

from __future__ import annotations

from capsnet.data.toynorb.dataset import generate_files, toynorb, toynorb_folder
from capsnet.data.toynorb.generate import TOYNORB_FILES, TOYNORB_MD5, generate_toynorb
from capsnet.data.toynorb.objects import (
    CATEGORIES,
    GENERATOR_VERSION,
    TEST_INSTANCES,
    TRAIN_INSTANCES,
    build_object,
)
from capsnet.data.toynorb.render import LIGHTINGS, render_views

__all__ = [
    "toynorb",
    "toynorb_folder",
    "generate_files",
    "generate_toynorb",
    "TOYNORB_FILES",
    "TOYNORB_MD5",
    "CATEGORIES",
    "GENERATOR_VERSION",
    "TRAIN_INSTANCES",
    "TEST_INSTANCES",
    "build_object",
    "LIGHTINGS",
    "render_views",
]
