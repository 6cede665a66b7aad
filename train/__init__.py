"""MMAP training (installed as `mmap_train`): the model, datasets, phase 1 and 2, evaluation."""

# Top-level modules of the `[train]` extra (pyproject.toml): training and export
# need them; a runtime-only install (`pip install .`) has none of them.
TRAIN_EXTRA_MODULES = ("torch", "torchvision", "timm", "peft", "sklearn", "onnx", "onnxscript", "safetensors")


def missing_train_extra(error: ModuleNotFoundError) -> str | None:
    """The one-line message for a missing module of the `[train]` extra; None for any other module."""
    module = (error.name or "").split(".")[0]
    if module not in TRAIN_EXTRA_MODULES:
        return None
    return (f"the training extra is not installed here (no module {module!r}); install it with "
            "pip install '.[train]' in the project folder (or pip install 'mmap-deploy[train]')")
