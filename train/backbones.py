"""The backbones an MMAP model can be built on: one table that configs, the CLI and the model read.

Each entry carries the architecture (timm model, width, depth, heads, patch
size) and the preprocessing it expects (normalisation mean/std), as data, so
that adding a backbone is one line here. Torch-free: the CLI reads the names
at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def get_backbone(name: str) -> Backbone:
    """The table entry of `name`; ValueError listing the known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {name!r}") from None


def backbone_of_width(embed_dim: int) -> Backbone | None:
    """The backbone whose embeddings are `embed_dim` wide (what a feature cache was made with), if any."""
    return next((b for b in BACKBONES.values() if b.embed_dim == embed_dim), None)
