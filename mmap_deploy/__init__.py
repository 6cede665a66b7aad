"""MMAP runtime: predict spatial gene expression from H&E slides with exported engines.

>>> import mmap_deploy as mm
>>> adata = mm.predict("slide.svs", "spaceranger/outs/", model="bundle/")   # doctest: +SKIP
>>> mm.write(adata, "slide.h5ad")                                           # doctest: +SKIP

The public names (`__all__`) are described in docs/api.md. Importing this
package is cheap and never imports torch: the names are loaded when first
used (PEP 562), and heavy modules (onnxruntime, openslide, anndata,
tensorrt) where they are used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

if TYPE_CHECKING:  # pragma: no cover
    from .api import DemoPaths, Predictor, demo_paths, detect_tissue, make_grid, predict, read_spots, write
    from .errors import (
        BundleError,
        EngineMismatchError,
        MMAPWarning,
        OutputStorageError,
        UserError,
    )
    from .inputs.tissue import Tissue
    from .location import set_storage_options

# public name -> the module that defines it
_LAZY = {
    "Predictor": "api",
    "predict": "api",
    "write": "api",
    "read_spots": "api",
    "demo_paths": "api",
    "detect_tissue": "api",
    "make_grid": "api",
    "Tissue": "inputs.tissue",
    "DemoPaths": "api",
    "UserError": "errors",
    "BundleError": "errors",
    "EngineMismatchError": "errors",
    "OutputStorageError": "errors",
    "MMAPWarning": "errors",
    "set_storage_options": "location",
}

__all__ = [
    "BundleError",
    "DemoPaths",
    "EngineMismatchError",
    "MMAPWarning",
    "OutputStorageError",
    "Predictor",
    "Tissue",
    "UserError",
    "demo_paths",
    "detect_tissue",
    "make_grid",
    "predict",
    "read_spots",
    "set_storage_options",
    "write",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
