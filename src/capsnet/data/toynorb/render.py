"""A small NumPy renderer for ToyNORB: camera on the viewing sphere, z-buffer, shading.

* Camera: perspective, at ``distance`` from the origin at smallNORB's azimuth (0..340
  degrees; 0 looks at the object's front) and elevation (30..70 degrees), looking at the
  origin with the world's z axis up. The stereo pair comes from two cameras ``baseline``
  apart along the camera's right axis, both aimed at the origin; channel 0 is the left
  camera.
* Rasteriser: every front-facing triangle is tested against the sample centres inside
  its bounding box on a ``supersample`` x finer grid (vectorised edge functions); the
  nearest sample wins (z-buffer by a max-reduction of 1/depth, which is exact in any
  order); normals are interpolated with perspective-correct barycentrics.
* Shading: Lambertian plus ambient, ``albedo * (ambient + diffuse * max(0, n . l))``,
  for each of the 6 lightings from the same rasterised geometry; lights are directional,
  fixed relative to the camera's azimuth (as the lamps of a room around a turntable) at
  absolute elevations. Uniform background; the supersamples are averaged (box filter)
  and rounded to uint8.

Everything is float64 elementwise NumPy without BLAS, so the bytes do not depend on
thread counts.

Shape:
    - :func:`render_views` returns ``(V, L, 2, S, S)`` uint8 for V (elevation, azimuth)
      views, L lightings, 2 cameras, S = ``size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from capsnet.data.toynorb.shapes import Mesh

__all__ = [
    "Light",
    "LIGHTINGS",
    "Camera",
    "camera",
    "stereo_cameras",
    "rasterize",
    "shade",
    "render_views",
    "ELEVATIONS",
    "AZIMUTHS",
]

#: smallNORB's grid: elevation code e -> 30 + 5 e degrees, azimuth code a -> 10 a degrees.
ELEVATIONS = tuple(30 + 5 * e for e in range(9))
AZIMUTHS = tuple(range(0, 360, 20))


@dataclass(frozen=True)
class Light:
    """A directional light: ``azimuth`` relative to the camera's (deg), absolute
    ``elevation`` (deg), ``diffuse`` strength and ``ambient`` level."""

    azimuth: float
    elevation: float
    diffuse: float = 0.75
    ambient: float = 0.25


#: The 6 lightings (smallNORB's lighting codes 0..5).
LIGHTINGS = (
    Light(-40.0, 45.0, 0.75, 0.25),
    Light(40.0, 45.0, 0.75, 0.25),
    Light(0.0, 75.0, 0.7, 0.3),
    Light(-90.0, 20.0, 0.85, 0.15),
    Light(90.0, 20.0, 0.85, 0.15),
    Light(0.0, 10.0, 0.5, 0.45),
)


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: ``position``, unit ``right``, ``up``, ``forward`` axes (world)."""

    position: np.ndarray
    right: np.ndarray
    up: np.ndarray
    forward: np.ndarray


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array(
        [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
    )


def _direction(azimuth: float, elevation: float) -> np.ndarray:
    a, e = np.deg2rad(azimuth), np.deg2rad(elevation)
    return np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])


def camera(azimuth: float, elevation: float, distance: float, offset: float = 0.0) -> Camera:
    """The camera at (``azimuth``, ``elevation``) degrees, moved ``offset`` along its right
    axis, aimed at the origin."""
    centre = distance * _direction(azimuth, elevation)
    forward = _unit(-centre)
    right = _unit(_cross(forward, np.array([0.0, 0.0, 1.0])))
    position = centre + offset * right
    forward = _unit(-position)
    right = _unit(_cross(forward, np.array([0.0, 0.0, 1.0])))
    return Camera(position, right, _cross(right, forward), forward)


def stereo_cameras(
    azimuth: float, elevation: float, distance: float, baseline: float
) -> tuple[Camera, Camera]:
    """Left and right cameras ``baseline`` apart, both aimed at the origin."""
    return (
        camera(azimuth, elevation, distance, -baseline / 2),
        camera(azimuth, elevation, distance, baseline / 2),
    )


def _project(cam: Camera, vertices: np.ndarray, size: int, fov: float):
    """Sample-grid coordinates ``(u, v)`` (u right, v down) and depth of each vertex."""
    d = vertices - cam.position
    x = d[:, 0] * cam.right[0] + d[:, 1] * cam.right[1] + d[:, 2] * cam.right[2]
    y = d[:, 0] * cam.up[0] + d[:, 1] * cam.up[1] + d[:, 2] * cam.up[2]
    z = d[:, 0] * cam.forward[0] + d[:, 1] * cam.forward[1] + d[:, 2] * cam.forward[2]
    focal = size / 2 / np.tan(np.deg2rad(fov) / 2)
    return size / 2 + focal * x / z, size / 2 - focal * y / z, z


def rasterize(
    u: np.ndarray, v: np.ndarray, depth: np.ndarray, faces: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-buffered coverage of the sample grid ``size`` x ``size`` (centres at i + 0.5).

    Args:
        u, v: ``(V,)`` sample-grid coordinates of the vertices (u right, v down).
        depth: ``(V,)`` positive camera depths.
        faces: ``(F, 3)`` triangles, counter-clockwise seen from outside.
        size: grid size.

    Returns:
        ``(pixel, face, bary)``: the covered sample indices ``(P,)`` (row-major), the
        visible face at each ``(P,)`` and its perspective-correct barycentric weights
        ``(P, 3)``.
    """
    u0, u1, u2 = u[faces[:, 0]], u[faces[:, 1]], u[faces[:, 2]]
    v0, v1, v2 = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    # v points down, so outward CCW triangles facing the camera have negative area.
    area = (u1 - u0) * (v2 - v0) - (u2 - u0) * (v1 - v0)
    x0 = np.maximum(np.ceil(np.minimum(np.minimum(u0, u1), u2) - 0.5), 0)
    x1 = np.minimum(np.floor(np.maximum(np.maximum(u0, u1), u2) - 0.5), size - 1)
    y0 = np.maximum(np.ceil(np.minimum(np.minimum(v0, v1), v2) - 0.5), 0)
    y1 = np.minimum(np.floor(np.maximum(np.maximum(v0, v1), v2) - 0.5), size - 1)
    keep = np.nonzero((area < 0) & (x1 >= x0) & (y1 >= y0))[0]
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3)))
    if keep.size == 0:
        return empty
    x0, y0 = x0[keep].astype(np.int64), y0[keep].astype(np.int64)
    w = x1[keep].astype(np.int64) - x0 + 1
    h = y1[keep].astype(np.int64) - y0 + 1
    counts = w * h
    tri = np.repeat(np.arange(keep.size), counts)
    start = np.cumsum(counts) - counts
    local = np.arange(tri.size) - start[tri]
    wt = w[tri]
    px = x0[tri] + local % wt
    py = y0[tri] + local // wt
    sx, sy = px + 0.5, py + 0.5
    k = keep[tri]
    U0, U1, U2, V0, V1, V2 = u0[k], u1[k], u2[k], v0[k], v1[k], v2[k]
    # Edge functions (barycentrics times the area), all <= 0 inside for area < 0.
    b0 = (U1 - sx) * (V2 - sy) - (U2 - sx) * (V1 - sy)
    b1 = (U2 - sx) * (V0 - sy) - (U0 - sx) * (V2 - sy)
    b2 = (U0 - sx) * (V1 - sy) - (U1 - sx) * (V0 - sy)
    inside = np.nonzero((b0 <= 0) & (b1 <= 0) & (b2 <= 0))[0]
    if inside.size == 0:
        return empty
    k = k[inside]
    a = area[k]
    b0, b1, b2 = b0[inside] / a, b1[inside] / a, b2[inside] / a
    f = faces[k]
    iz0, iz1, iz2 = 1.0 / depth[f[:, 0]], 1.0 / depth[f[:, 1]], 1.0 / depth[f[:, 2]]
    q0, q1, q2 = b0 * iz0, b1 * iz1, b2 * iz2
    inv_depth = q0 + q1 + q2
    pixel = py[inside] * size + px[inside]
    # Z-buffer: the largest 1/depth per sample (max is exact in any order); ties go to
    # the highest candidate index.
    best = np.full(size * size, -np.inf)
    np.maximum.at(best, pixel, inv_depth)
    win = np.nonzero(inv_depth == best[pixel])[0]
    chosen = np.full(size * size, -1, np.int64)
    np.maximum.at(chosen, pixel[win], win)
    covered = np.nonzero(chosen >= 0)[0]
    c = chosen[covered]
    bary = np.stack([q0[c], q1[c], q2[c]], 1) / inv_depth[c][:, None]
    return covered, k[c], bary


def shade(
    normals: np.ndarray, albedo: np.ndarray, azimuth: float, lights: Sequence[Light]
) -> np.ndarray:
    """Lambert + ambient intensity ``(P, L)`` of surface points with unit ``normals``
    ``(P, 3)`` and ``albedo`` ``(P,)`` seen from a camera at ``azimuth`` (deg)."""
    out = np.empty((normals.shape[0], len(lights)))
    for i, light in enumerate(lights):
        d = _direction(azimuth + light.azimuth, light.elevation)
        lambert = normals[:, 0] * d[0] + normals[:, 1] * d[1] + normals[:, 2] * d[2]
        out[:, i] = albedo * (light.ambient + light.diffuse * np.maximum(lambert, 0.0))
    return out


def _render_camera(
    mesh: Mesh, cam: Camera, azimuth: float, lights, size: int, supersample: int, fov: float,
    background: float,
) -> np.ndarray:  # fmt: skip
    """``(L, size, size)`` float images of ``mesh`` from ``cam`` under each light."""
    grid = size * supersample
    u, v, depth = _project(cam, mesh.vertices, grid, fov)
    pixel, face, bary = rasterize(u, v, depth, mesh.faces, grid)
    f = mesh.faces[face]
    n = (
        mesh.normals[f[:, 0]] * bary[:, 0:1]
        + mesh.normals[f[:, 1]] * bary[:, 1:2]
        + mesh.normals[f[:, 2]] * bary[:, 2:3]
    )
    n = n / np.maximum(np.sqrt(n[:, 0] ** 2 + n[:, 1] ** 2 + n[:, 2] ** 2), 1e-12)[:, None]
    samples = np.full((len(lights), grid * grid), float(background))
    samples[:, pixel] = shade(n, mesh.albedo[face], azimuth, lights).T
    blocks = samples.reshape(len(lights), size, supersample, size, supersample)
    return blocks.sum(axis=(2, 4)) / (supersample * supersample)


def render_views(
    mesh: Mesh,
    views: Sequence[tuple[float, float]],
    *,
    lights: Sequence[Light] = LIGHTINGS,
    size: int = 96,
    supersample: int = 3,
    fov: float = 30.0,
    distance: float = 4.2,
    baseline: float = 0.25,
    background: float = 0.45,
) -> np.ndarray:
    """Render ``mesh`` from each ``(elevation, azimuth)`` view (degrees) as stereo pairs.

    Args:
        mesh: object in world coordinates (z up), centred near the origin.
        views: ``(elevation, azimuth)`` pairs in degrees.
        lights: the lightings; each gives one image per camera.
        size: output image size (96 as smallNORB).
        supersample: samples per pixel along each axis (antialiasing).
        fov: vertical field of view (deg).
        distance: camera distance from the origin.
        baseline: distance between the two cameras (0 renders the same view twice).
        background: uniform background intensity in [0, 1].

    Returns:
        uint8 ``(len(views), len(lights), 2, size, size)``.
    """
    out = np.empty((len(views), len(lights), 2, size, size), dtype=np.uint8)
    for i, (elevation, azimuth) in enumerate(views):
        for j, cam in enumerate(stereo_cameras(azimuth, elevation, distance, baseline)):
            image = _render_camera(mesh, cam, azimuth, lights, size, supersample, fov, background)
            out[i, :, j] = np.floor(np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out
