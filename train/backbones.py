"""The backbones an MMAP model can be built on: one table that configs, the CLI and the model read.

Each entry carries the architecture (timm model, width, depth, heads, patch
size) and the preprocessing it expects (normalisation mean/std), as data, so
that adding a backbone is one line here. Torch-free: the CLI reads the names
at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmap_deploy.errors import UserError
from mmap_deploy.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, ViewSpec


@dataclass(frozen=True)
class Backbone:
    """One ViT backbone: its timm architecture and the preprocessing it was trained with."""

    name: str  # the config and CLI name
    timm_name: str  # built with timm.create_model at the model's input size
    embed_dim: int
    depth: int
    heads: int
    about: str
    patch_size: int = 16
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def view_spec(self, **fields) -> ViewSpec:
        """The default view spec for this backbone (its normalisation), with `fields` overridden."""
        return ViewSpec(**{"mean": self.mean, "std": self.std, **fields})


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("tiny", "vit_tiny_patch16_224", 96, 4, 3, "a 4-block ViT for tests and CPU demos"),
    Backbone("small", "vit_small_patch16_224", 384, 12, 6, "ViT-S/16"),
    Backbone("uni", "vit_large_patch16_224", 1024, 24, 16, "UNI's ViT-L/16 (weights from a local file)"),
)}


def check_choice(what: str, value: object, known) -> None:
    """UserError, listing the `known` values, when a string setting `what` is not one of them."""
    if value not in known:
        raise UserError(f"{what} must be one of {', '.join(known)}; got {value!r}")


def get_backbone(name: str) -> Backbone:
    """The table entry of `name`; UserError listing the known names."""
    check_choice("backbone", name, BACKBONES)
    return BACKBONES[name]


def check_weights_file(path: str | Path) -> Path:
    """`path` when it is a file; a UserError saying how to get UNI's weights otherwise.

    Checked by the CLI before it reads any data, and again where the weights load.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise UserError(f"{path}: backbone weights file {what}; UNI's weights are gated: download "
                        "pytorch_model.bin once from hf.co/MahmoodLab/UNI, then pass that local file "
                        "to --backbone-weights")
    return path


def backbones_of_width(embed_dim: int) -> list[Backbone]:
    """The backbones whose embeddings are `embed_dim` wide: the guess for a feature cache that does not name
    its backbone (`features.cache_backbone`); more than one once two backbones share a width."""
    return [b for b in BACKBONES.values() if b.embed_dim == embed_dim]
