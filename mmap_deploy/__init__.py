"""MMAP runtime: predict spatial gene expression from H&E slides with exported engines.

Importing this package is cheap and never imports torch: heavy modules
(onnxruntime, openslide, anndata, tensorrt) are imported where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
