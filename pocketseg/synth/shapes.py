"""Smooth, irregular solids evaluated on an axis-aligned voxel grid in patient millimetres.

Two primitives make every organ of the phantom: a deformed ellipsoid (a
quadric whose radius is modulated by a few low-frequency plane waves, so the
surface is smooth but not an ellipsoid) and a tube (a union of spheres swept
along a smooth curve, with a radius that varies along the path). Both are
evaluated only inside their bounding box, which keeps a 512x512x200 case fast.

Coordinates here are patient millimetres, RAS+ (x to the patient's right,
y anterior, z superior); the canvas axes are (x, y, z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Wobble:
    """A smooth random field: a sum of plane waves with wavelengths of several centimetres."""

    k: np.ndarray  # (n, 3) wave vectors, rad/mm
    phase: np.ndarray  # (n,)
    amp: np.ndarray  # (n,)

    @staticmethod
    def random(rng: np.random.Generator, amplitude: float, wavelength_mm: tuple[float, float] = (40.0, 120.0), n: int = 5) -> Wobble:
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(*wavelength_mm, size=n)
        k = direction * (2 * np.pi / wavelength)[:, None]
        amp = rng.uniform(0.5, 1.0, size=n)
        amp *= amplitude / amp.sum()
        return Wobble(k=k.astype(np.float32), phase=rng.uniform(0, 2 * np.pi, size=n).astype(np.float32), amp=amp.astype(np.float32))

    def __call__(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        total = None
        for (kx, ky, kz), ph, a in zip(self.k, self.phase, self.amp):
            term = np.sin((kx * X + ph) + ky * Y + kz * Z) * a
            total = term if total is None else total + term
        return total


def rotation(rng: np.random.Generator | None = None, max_deg: float = 0.0, *, about: str = "", deg: float = 0.0) -> np.ndarray:
    """A rotation matrix: a fixed rotation ``deg`` about one axis, then a small random tilt."""
    R = np.eye(3)
    if about:
        a = np.radians(deg)
        c, s = np.cos(a), np.sin(a)
        i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[about]
        Rf = np.eye(3)
        Rf[i, i], Rf[i, j], Rf[j, i], Rf[j, j] = c, -s, s, c
        R = Rf @ R
    if rng is not None and max_deg > 0:
        for axis in "xyz":
            R = rotation(about=axis, deg=float(rng.uniform(-max_deg, max_deg))) @ R
    return R


@dataclass(frozen=True)
class Ellipsoid:
    """Deformed ellipsoid: inside where |R^T (p - c) / semi| <= 1 + wobble(p)."""

    center: Vec3
    semi: Vec3
    rot: np.ndarray | None = None  # columns: the local axes in patient coordinates
    wobble: Wobble | None = None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        grow = 1.0 + (float(self.wobble.amp.sum()) if self.wobble is not None else 0.0)
        semi = np.asarray(self.semi, dtype=np.float64) * grow
        if self.rot is not None:
            semi = np.abs(self.rot) @ semi  # axis-aligned box of the rotated ellipsoid
        c = np.asarray(self.center, dtype=np.float64)
        return c - semi, c + semi

    def radius(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """Normalised radius (1 on the surface) of the undeformed ellipsoid."""
        dx, dy, dz = X - np.float32(self.center[0]), Y - np.float32(self.center[1]), Z - np.float32(self.center[2])
        a, b, c = (np.float32(1.0 / s) for s in self.semi)
        if self.rot is None:
            q = (dx * a) ** 2 + (dy * b) ** 2 + (dz * c) ** 2
        else:
            R = self.rot.astype(np.float32)
            u = dx * R[0, 0] + dy * R[1, 0] + dz * R[2, 0]
            v = dx * R[0, 1] + dy * R[1, 1] + dz * R[2, 1]
            w = dx * R[0, 2] + dy * R[1, 2] + dz * R[2, 2]
            q = (u * a) ** 2 + (v * b) ** 2 + (w * c) ** 2
        return np.sqrt(q)

    def field(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """< 0 inside, 0 on the deformed surface, > 0 outside (unitless)."""
        r = self.radius(X, Y, Z)
        return r - 1.0 if self.wobble is None else r - (1.0 + self.wobble(X, Y, Z))

    def __call__(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        return self.field(X, Y, Z) <= 0


def smooth_curve(points: np.ndarray, step_mm: float) -> np.ndarray:
    """Catmull-Rom spline through ``points`` (n, 3), resampled every ``step_mm`` along its length."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 2:
        return pts
    ext = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    dense = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        t = np.linspace(0, 1, 24, endpoint=False)[:, None]
        dense.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    dense.append(pts[-1:])
    dense = np.vstack(dense)
    seg = np.linalg.norm(np.diff(dense, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(np.ceil(arc[-1] / step_mm)) + 1)
    s = np.linspace(0, arc[-1], n)
    return np.stack([np.interp(s, arc, dense[:, d]) for d in range(3)], axis=1)


@dataclass(frozen=True)
class Tube:
    """A union of spheres along a smooth curve through control points with per-point radii."""

    points: np.ndarray  # (n, 3) control points, mm
    radii: np.ndarray  # (n,) radius at each control point, mm
    flatten: Vec3 = (1.0, 1.0, 1.0)  # per-axis squash of each sphere (e.g. a flattened IVC)

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """Sphere centres and radii along the curve, spaced at a third of the smallest radius."""
        step = max(0.5, float(np.min(self.radii)) / 3.0)
        centres = smooth_curve(self.points, step)
        # Radii follow the curve by nearest control-point arc position (linear in arc length).
        ctrl = np.asarray(self.points, dtype=np.float64)
        ctrl_arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))])
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(centres, axis=0), axis=1))])
        arc *= ctrl_arc[-1] / max(arc[-1], 1e-9)
        radii = np.interp(arc, ctrl_arc, np.asarray(self.radii, dtype=np.float64))
        return centres, radii

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        c, r = self.samples()
        f = np.asarray(self.flatten)
        return (c - r[:, None] * f).min(axis=0), (c + r[:, None] * f).max(axis=0)


def jitter(rng: np.random.Generator, points: list[Vec3], sd_mm: float) -> np.ndarray:
    """Control points with independent Gaussian displacements (per-case shape variation)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts + rng.normal(scale=sd_mm, size=pts.shape)
