"""Preview images: radiological display convention, orientation independence, PNG output."""

from __future__ import annotations

import numpy as np

from pocketseg.synth.phantom import make_phantom
from pocketseg.preview import _display, render_preview, to_ras, write_preview


def test_display_puts_patient_right_left_and_anterior_superior_up():
    plane = np.zeros((4, 3))  # (x: left->right, y or z: posterior/inferior -> anterior/superior)
    plane[3, 0] = 1  # patient's right-most, posterior/inferior-most
    shown = _display(plane)
    assert shown.shape == (3, 4)
    assert shown[-1, 0] == 1  # bottom-left on screen


def test_to_ras_reorders_axes_and_spacing():
    data = np.arange(24).reshape(2, 3, 4)
    affine = np.array([[0, 0, -3.0, 0], [0, 2.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])  # i->S, j->A, k->L
    out, spacing = to_ras(data, affine)
    assert out.shape == (4, 3, 2) and spacing == (3.0, 2.0, 1.0)
    assert out[0, 0, 0] == data[0, 0, 3]  # x index 0 (left-most) is the last k


def test_preview_is_the_same_whatever_the_stored_orientation(tmp_path):
    a = make_phantom(9, small=True, slices=40, orientation="RAS")
    b = make_phantom(9, small=True, slices=40, orientation="LPI")
    png_a = render_preview(a.image, a.affine, a.labels, title="t")
    png_b = render_preview(b.image, b.affine, b.labels, title="t")
    assert png_a == png_b
    assert png_a != render_preview(a.image, a.affine, None, title="t")
    out = write_preview(tmp_path / "p.png", a.image, a.affine, a.labels)
    assert out.read_bytes()[:4] == b"\x89PNG"
