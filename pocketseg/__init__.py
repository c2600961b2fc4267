"""pocketseg: cascaded Pocket U-Net segmentation of abdominal CT with FLARE 2023 labels.

The public entry points are module attributes, imported on first use so that
``import pocketseg`` stays light (no SciPy, nibabel or runtime until asked for):

* :func:`pocketseg.segment` - one scan in, one nibabel label image out;
* :func:`pocketseg.predict` - files, DICOM series and folders in, label files out;
* :class:`pocketseg.CascadePredictor` - a loaded model package for many scans.
"""

from __future__ import annotations

import importlib
from typing import Any

from pocketseg.version import __version__

__all__ = ["CascadePredictor", "__version__", "predict", "segment"]

#: Public attribute -> the module that defines it.
_LAZY = {"segment": "pocketseg.runtime.predict", "predict": "pocketseg.runtime.predict",
         "CascadePredictor": "pocketseg.runtime.cascade"}


def __getattr__(name: str) -> Any:
    # PEP 562: the runtime is imported when one of its entry points is first used, not at `import pocketseg`.
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pocketseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
