"""Overlay previews: axial, coronal and sagittal views with the label map and a legend.

Views follow the radiological convention (patient's right on the image's left,
anterior up in axial views, superior up in coronal and sagittal views) with an
abdominal soft-tissue window (W400/L40), whatever the stored orientation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from pocketseg import labels as L
from pocketseg.atomic import atomic_write_bytes
from pocketseg.geometry import spacing_from_affine
from pocketseg.plotting import png_bytes, pyplot

WINDOW_HU = (-160.0, 240.0)  # W400 / L40


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorder an (i, j, k) array to the nearest RAS+ axes; returns it with its spacing."""
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(data, ornt)
    spacing = spacing_from_affine(affine)
    order = ornt[:, 0].astype(int)
    ras_spacing = [0.0, 0.0, 0.0]
    for src, dst in enumerate(order):
        ras_spacing[dst] = spacing[src]
    return out, tuple(ras_spacing)  # type: ignore[return-value]


def _display(plane: np.ndarray) -> np.ndarray:
    # plane is (horizontal world axis, vertical world axis) in RAS; rows become the vertical axis,
    # flipped so that anterior/superior is up and the patient's right is on the left.
    return plane.T[::-1, ::-1]


def _views(image: np.ndarray, labels: np.ndarray | None, spacing):
    """Slice indices of the three views: through the right kidney when labelled, else the volume centre.

    The axial level is the one showing the most distinct labels (the pancreas/kidney level).
    """
    nx, ny, nz = image.shape
    i, j, k = nx // 2, ny // 2, nz // 2
    if labels is not None and labels.any():
        present = np.stack([(labels == lab.id).any(axis=(0, 1)) for lab in L.LABELS[1:]])
        k = int(np.argmax(present.sum(axis=0)))
        kidney = np.argwhere(labels == L.BY_NAME["right_kidney"].id)
        if kidney.size:
            i, j = (int(v) for v in np.round(kidney[:, :2].mean(axis=0)))
    sx, sy, sz = spacing
    return [
        (f"axial  z={k}", (slice(None), slice(None), k), sy / sx),
        (f"coronal  y={j}", (slice(None), j, slice(None)), sz / sx),
        (f"sagittal  x={i}", (i, slice(None), slice(None)), sz / sy),
    ]


def render_preview(image: np.ndarray, affine: np.ndarray, labels: np.ndarray | None = None, *, title: str = "",
                   label_names: Mapping[str, int] | None = None) -> bytes:
    """PNG bytes of a three-view preview of ``image`` (HU) with an optional label overlay.

    ``label_names`` is the label set of ``labels`` (``{name: id}``; FLARE 2023's when None).
    """
    plt = pyplot("Preview images")
    from matplotlib.patches import Patch  # optional (viz extra), importable once pyplot() succeeded

    img, spacing = to_ras(image, affine)
    lab = to_ras(labels, affine)[0] if labels is not None else None
    rows = [label for label in L.label_set(label_names) if label.id != 0]
    colors = np.zeros((256, 4), dtype=np.float32)
    for label in rows:
        colors[label.id, :3] = np.array(label.color_rgb) / 255.0
        colors[label.id, 3] = 0.45
    fig, axes = plt.subplots(1, 3, figsize=(16, 6.2), facecolor="black")
    for ax, (name, index, aspect) in zip(axes, _views(img, lab, spacing)):
        ax.imshow(_display(img[index]), cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect,
                  interpolation="bilinear")
        if lab is not None:
            ax.imshow(colors[_display(lab[index])], aspect=aspect, interpolation="nearest")
        ax.set_title(name, color="white", fontsize=10)
        ax.axis("off")
    if lab is not None:
        present = [label for label in rows if (lab == label.id).any()]
        handles = [Patch(color=np.array(label.color_rgb) / 255.0, label=f"{label.id} {label.display}") for label in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(8, max(1, len(handles))), fontsize=8,
                   facecolor="black", labelcolor="white", frameon=False)
    fig.suptitle(title, color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return png_bytes(fig, dpi=90, facecolor="black")


def write_preview(path: str | os.PathLike, image: np.ndarray, affine: np.ndarray, labels: np.ndarray | None = None, *,
                  title: str = "", overwrite: bool = False) -> Path:
    """Write :func:`render_preview` to ``path`` atomically."""
    return atomic_write_bytes(path, render_preview(image, affine, labels, title=title), overwrite=overwrite)
