"""matplotlib for the package's figures, in one place: imported on first use, headless, figures to PNG bytes.

matplotlib is optional (the ``viz`` extra): :func:`pyplot` names the extra when it
is missing, and callers that can do without a figure catch that error.
"""

from __future__ import annotations

import io
from types import ModuleType
from typing import Any

from pocketseg.errors import MissingDependencyError

__all__ = ["png_bytes", "pyplot"]


def pyplot(feature: str) -> ModuleType:
    """``matplotlib.pyplot`` on the headless Agg backend; :class:`MissingDependencyError` naming ``feature``."""
    try:  # matplotlib is optional (viz extra)
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and in containers
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", feature, "viz") from None
    return plt


def png_bytes(fig: Any, **savefig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive otherwise)."""
    plt = pyplot("Figures")
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", **savefig)
    finally:
        plt.close(fig)
    return buffer.getvalue()
