"""Primitive triangle meshes for ToyNORB: boxes, cylinders, cones, ellipsoids, spheres.

Every primitive is a closed mesh with outward-facing counter-clockwise triangles and
per-vertex normals (flat faces get their own vertices, curved surfaces smooth normals).
Meshes are built in float64 from exact angle tables, so a primitive placed symmetrically
about the plane ``y = 0`` gives a mirror-symmetric mesh.

Coordinates: x forward (the object's front), y to the object's left, z up.

Shape:
    - ``Mesh.vertices``: ``(V, 3)`` float64; ``Mesh.normals``: ``(V, 3)`` unit.
    - ``Mesh.faces``: ``(F, 3)`` int64 vertex indices; ``Mesh.albedo``: ``(F,)`` float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "Mesh",
    "merge",
    "box",
    "hexahedron",
    "cylinder",
    "cone",
    "ellipsoid",
    "sphere",
    "rotation",
]


@dataclass
class Mesh:
    """A triangle mesh with vertex normals and one albedo (reflectance in [0, 1]) per face."""

    vertices: np.ndarray
    normals: np.ndarray
    faces: np.ndarray
    albedo: np.ndarray

    def transformed(self, matrix: np.ndarray, offset: ArrayLike = (0.0, 0.0, 0.0)) -> Mesh:
        """``matrix @ v + offset`` for every vertex (normals by the inverse transpose)."""
        m = np.asarray(matrix, dtype=np.float64)
        v = _apply(m, self.vertices) + np.asarray(offset, dtype=np.float64)
        n = _normalise(_apply(np.linalg.inv(m).T, self.normals))
        faces = self.faces if np.linalg.det(m) > 0 else self.faces[:, ::-1].copy()
        return Mesh(v, n, faces, self.albedo.copy())

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(min, max)`` corners of the axis-aligned bounding box."""
        return self.vertices.min(0), self.vertices.max(0)


def _apply(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``v @ m.T`` written out (no BLAS: the same bits on every machine)."""
    return np.stack(
        [v[:, 0] * m[i, 0] + v[:, 1] * m[i, 1] + v[:, 2] * m[i, 2] for i in range(3)], 1
    )


def _normalise(v: np.ndarray) -> np.ndarray:
    length = np.sqrt(v[:, 0] ** 2 + v[:, 1] ** 2 + v[:, 2] ** 2)
    return v / np.maximum(length, 1e-12)[:, None]


def merge(meshes: Sequence[Mesh]) -> Mesh:
    """One mesh holding all ``meshes`` (faces re-indexed)."""
    offsets = np.cumsum([0] + [m.vertices.shape[0] for m in meshes[:-1]])
    return Mesh(
        np.concatenate([m.vertices for m in meshes]),
        np.concatenate([m.normals for m in meshes]),
        np.concatenate([m.faces + o for m, o in zip(meshes, offsets, strict=True)]),
        np.concatenate([m.albedo for m in meshes]),
    )


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about ``"x"``, ``"y"`` or ``"z"`` by ``degrees`` (right-handed)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(f"axis must be 'x', 'y' or 'z', got {axis!r}")


# The 6 faces of a cube as corner indices (corner k has bits x = k & 1, y = k & 2, z = k & 4),
# counter-clockwise seen from outside.
_CUBE_FACES = ((0, 4, 6, 2), (1, 3, 7, 5), (0, 1, 5, 4), (2, 6, 7, 3), (0, 2, 3, 1), (4, 5, 7, 6))


def hexahedron(corners: np.ndarray, albedo: float) -> Mesh:
    """A six-sided solid from its 8 corners (index bits: x = 1, y = 2, z = 4), flat shaded.

    The corners of a box may be moved (tapered wings, sloped windscreens) as long as every
    face stays planar enough and the solid convex.
    """
    corners = np.asarray(corners, dtype=np.float64).reshape(8, 3)
    centre = corners.mean(0)
    vertices: list[np.ndarray] = []
    normals: list[np.ndarray] = []
    faces: list[tuple[int, int, int]] = []
    for quad in _CUBE_FACES:
        p = corners[list(quad)]
        n = np.cross(p[2] - p[0], p[3] - p[1])
        if np.dot(n, p.mean(0) - centre) < 0:  # keep the winding outward
            p, n = p[::-1], -n
        n = n / max(np.linalg.norm(n), 1e-12)
        base = len(vertices)
        vertices.extend(p)
        normals.extend([n] * 4)
        faces += [(base, base + 1, base + 2), (base, base + 2, base + 3)]
    return Mesh(
        np.array(vertices),
        np.array(normals),
        np.array(faces, dtype=np.int64),
        np.full(12, float(albedo)),
    )


def box(
    center: ArrayLike,
    size: ArrayLike,
    albedo: float,
    *,
    matrix: np.ndarray | None = None,
) -> Mesh:
    """Axis-aligned box of ``size`` (dx, dy, dz) at ``center`` (``matrix`` rotates/shears it)."""
    bits = np.array([[k & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)], dtype=np.float64)
    corners = (bits - 0.5) * np.asarray(size, dtype=np.float64)
    if matrix is not None:
        corners = _apply(np.asarray(matrix, dtype=np.float64), corners)
    return hexahedron(corners + np.asarray(center, dtype=np.float64), albedo)


def _frame(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to ``direction`` and to each other (right-handed)."""
    d = direction / np.linalg.norm(direction)
    helper = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(helper, d)
    u /= np.linalg.norm(u)
    return u, np.cross(d, u)


def cylinder(
    p0: ArrayLike,
    p1: ArrayLike,
    radius: float,
    albedo: float,
    *,
    radius1: float | None = None,
    segments: int = 14,
) -> Mesh:
    """A (possibly tapered) closed cylinder from ``p0`` to ``p1``; ``radius1`` at ``p1``.

    ``radius1=0`` gives a cone. Sides are smooth shaded, the caps flat.
    """
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    r0, r1 = float(radius), float(radius if radius1 is None else radius1)
    axis = p1 - p0
    length = np.linalg.norm(axis)
    if length <= 0:
        raise ValueError("cylinder needs two distinct end points")
    d = axis / length
    u, w = _frame(axis)
    t = 2 * np.pi * np.arange(segments) / segments
    ring = np.cos(t)[:, None] * u + np.sin(t)[:, None] * w  # (S, 3) unit directions
    slope = (r0 - r1) / length  # side normal tilts toward p1 when the radius shrinks
    side_n = ring + slope * d
    side_n /= np.linalg.norm(side_n, axis=1, keepdims=True)
    bottom = p0 + r0 * ring
    top = p1 + r1 * ring
    S = segments
    idx = np.arange(S)
    nxt = (idx + 1) % S
    vertices = [bottom, top]
    normals = [side_n, side_n]
    faces = []  # the side's quads as two triangles, without the degenerate one at a tip
    if r1 > 0:
        faces.append(np.stack([idx, S + nxt, S + idx], 1))
    if r0 > 0:
        faces.append(np.stack([idx, nxt, S + nxt], 1))
    base = 2 * S
    # caps: centre vertex + ring, flat normals
    for centre, r, sign in ((p0, r0, -1.0), (p1, r1, 1.0)):
        if r <= 0:
            continue
        vertices += [centre[None], centre + r * ring]
        normals += [np.tile(sign * d, (S + 1, 1))]
        c = base
        ring_idx = base + 1 + idx
        ring_nxt = base + 1 + nxt
        if sign > 0:
            faces.append(np.stack([np.full(S, c), ring_idx, ring_nxt], 1))
        else:
            faces.append(np.stack([np.full(S, c), ring_nxt, ring_idx], 1))
        base += S + 1
    faces_arr = np.concatenate(faces).astype(np.int64)
    return Mesh(
        np.concatenate(vertices),
        np.concatenate(normals),
        faces_arr,
        np.full(faces_arr.shape[0], float(albedo)),
    )


def cone(base: ArrayLike, apex: ArrayLike, radius: float, albedo: float, **kw) -> Mesh:
    """A cone with a disc of ``radius`` at ``base`` and its tip at ``apex``."""
    return cylinder(base, apex, radius, albedo, radius1=0.0, **kw)


def ellipsoid(
    center: ArrayLike,
    radii: ArrayLike,
    albedo: float,
    *,
    matrix: np.ndarray | None = None,
    rings: int = 9,
    segments: int = 16,
) -> Mesh:
    """An ellipsoid with semi-axes ``radii`` along x, y, z (then ``matrix``), smooth shaded."""
    phi = np.pi * np.arange(1, rings) / rings  # polar angles without the poles
    theta = 2 * np.pi * np.arange(segments) / segments
    sp, cp = np.sin(phi)[:, None], np.cos(phi)[:, None]
    unit = np.stack(
        [
            (sp * np.cos(theta)).ravel(),
            (sp * np.sin(theta)).ravel(),
            np.broadcast_to(cp, (rings - 1, segments)).ravel(),
        ],
        1,
    )
    unit = np.concatenate([[[0.0, 0.0, 1.0]], unit, [[0.0, 0.0, -1.0]]])
    S = segments
    faces = []
    top, bottom = 0, 1 + (rings - 1) * S
    j = np.arange(S)
    jn = (j + 1) % S
    faces.append(np.stack([np.full(S, top), 1 + j, 1 + jn], 1))
    for i in range(rings - 2):
        a, b = 1 + i * S, 1 + (i + 1) * S
        faces.append(np.stack([a + j, b + j, b + jn], 1))
        faces.append(np.stack([a + j, b + jn, a + jn], 1))
    last = 1 + (rings - 2) * S
    faces.append(np.stack([np.full(S, bottom), last + jn, last + j], 1))
    r = np.asarray(radii, dtype=np.float64)
    mesh = Mesh(
        unit * r,
        _normalise(unit / r),
        np.concatenate(faces).astype(np.int64),
        np.zeros(0),
    )
    mesh.albedo = np.full(mesh.faces.shape[0], float(albedo))
    if matrix is not None:
        mesh = mesh.transformed(matrix)
    mesh.vertices = mesh.vertices + np.asarray(center, dtype=np.float64)
    return mesh


def sphere(center: ArrayLike, radius: float, albedo: float, **kw) -> Mesh:
    """A sphere (an ellipsoid with equal radii)."""
    return ellipsoid(center, (radius, radius, radius), albedo, **kw)
