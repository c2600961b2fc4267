"""The voxel canvas the phantom is painted on: tissue and label arrays over patient coordinates.

Arrays are (x, y, z) in patient RAS+ millimetres and Fortran-ordered, so a
z-slice is contiguous and the NIfTI writer needs no reordering.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from pocketseg.synth.shapes import Ellipsoid, Tube

Mask = np.ndarray
Solid = Callable[[np.ndarray, np.ndarray, np.ndarray], Mask]


class Canvas:
    def __init__(self, x_mm: np.ndarray, y_mm: np.ndarray, z_mm: np.ndarray):
        for name, axis in (("x", x_mm), ("y", y_mm), ("z", z_mm)):
            if np.any(np.diff(axis) <= 0):
                raise ValueError(f"{name} coordinates must increase")
        self.x = np.asarray(x_mm, dtype=np.float32)
        self.y = np.asarray(y_mm, dtype=np.float32)
        self.z = np.asarray(z_mm, dtype=np.float32)
        shape = (len(self.x), len(self.y), len(self.z))
        self.tissue = np.zeros(shape, dtype=np.uint8, order="F")
        self.labels = np.zeros(shape, dtype=np.uint8, order="F")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.tissue.shape  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(a[1] - a[0]) if len(a) > 1 else 1.0 for a in (self.x, self.y, self.z))  # type: ignore[return-value]

    def box(self, lo, hi):
        """Index slices and broadcastable coordinates of the grid points inside [lo, hi]; None if empty."""
        sl = []
        for axis, a, b in zip((self.x, self.y, self.z), lo, hi):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        sx, sy, sz = sl
        return (sx, sy, sz), self.x[sx, None, None], self.y[None, sy, None], self.z[None, None, sz]

    def allowed(self, region, replace: Iterable[int] | None) -> Mask | None:
        if replace is None:
            return None
        ok = np.zeros(256, dtype=bool)  # lookup table: far faster than np.isin on large boxes
        ok[np.asarray(list(replace), dtype=np.intp)] = True
        return ok[self.tissue[region]]

    def paint(self, solid: Ellipsoid | Solid, tissue: int, label: int = 0, *, bounds=None,
              replace: Iterable[int] | None = None, inside_label: int | None = None):
        """Paint ``solid`` where the current tissue is in ``replace`` (anything if None)
        and, with ``inside_label``, only inside that label.

        Returns (region, mask) of what was painted, or None when nothing was.
        """
        lo, hi = bounds if bounds is not None else solid.bounds()  # type: ignore[union-attr]
        found = self.box(lo, hi)
        if found is None:
            return None
        region, X, Y, Z = found
        mask = np.broadcast_to(solid(X, Y, Z), self.tissue[region].shape).copy()
        ok = self.allowed(region, replace)
        if ok is not None:
            mask &= ok
        if inside_label is not None:
            mask &= self.labels[region] == inside_label
        self.tissue[region][mask] = tissue
        self.labels[region][mask] = label
        return region, mask

    def tube_distance(self, tube: Tube, margin_mm: float = 0.0):
        """Signed distance (mm, < 0 inside) to a tube, over its bounding box; None if off-grid."""
        centres, radii = tube.samples()
        flat = np.asarray(tube.flatten, dtype=np.float32)
        lo = (centres - radii[:, None] * flat).min(axis=0) - margin_mm
        hi = (centres + radii[:, None] * flat).max(axis=0) + margin_mm
        found = self.box(lo, hi)
        if found is None:
            return None
        region, X, Y, Z = found
        sd = np.full(self.tissue[region].shape, np.inf, dtype=np.float32)
        ox, oy, oz = region[0].start, region[1].start, region[2].start
        for c, r in zip(centres, radii):
            reach = (r + margin_mm) * flat
            sub = self.box(c - reach, c + reach)
            if sub is None:
                continue
            (sx, sy, sz), Xs, Ys, Zs = sub
            local = (slice(max(sx.start - ox, 0), min(sx.stop - ox, sd.shape[0])),
                     slice(max(sy.start - oy, 0), min(sy.stop - oy, sd.shape[1])),
                     slice(max(sz.start - oz, 0), min(sz.stop - oz, sd.shape[2])))
            if any(s.stop <= s.start for s in local):
                continue
            Xs = Xs[local[0].start + ox - sx.start:local[0].stop + ox - sx.start]
            Ys = Ys[:, local[1].start + oy - sy.start:local[1].stop + oy - sy.start]
            Zs = Zs[:, :, local[2].start + oz - sz.start:local[2].stop + oz - sz.start]
            d = np.sqrt(((Xs - np.float32(c[0])) / flat[0]) ** 2 + ((Ys - np.float32(c[1])) / flat[1]) ** 2
                        + ((Zs - np.float32(c[2])) / flat[2]) ** 2) - np.float32(r)
            np.minimum(sd[local], d, out=sd[local])
        return region, sd

    def paint_mask(self, region, mask: Mask, tissue: int, label: int = 0, replace: Iterable[int] | None = None):
        ok = self.allowed(region, replace)
        if ok is not None:
            mask = mask & ok
        self.tissue[region][mask] = tissue
        self.labels[region][mask] = label
        return region, mask
