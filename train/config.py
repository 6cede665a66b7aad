"""The model configuration: saved in every checkpoint, read by export."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mmap_deploy.errors import UserError
from mmap_deploy.model.bundle import HEAD_AVERAGES
from mmap_deploy.model.neighbours import NeighbourSmoothing
from mmap_deploy.model.preprocess import ViewSpec
from mmap_deploy.model.prototypes import PrototypeRule

from .backbones import BACKBONES, check_choice, get_backbone

# Checkpoints written before the view spec and the prototype rule were nested
# held their fields flat; from_dict moves them in.
_FLAT_VIEW_FIELDS = ("patch_um", "mpp", "input_size", "crop_fractions")
_FLAT_RULE_FIELDS = ("k_min", "k_max", "k_divisor", "l_ratio", "l_fixed")
MAG_LOSSES = ("cosine", "contrastive")


@dataclass
class MMAPConfig:
    """Everything that defines an MMAP model's architecture and preprocessing.

    Defaults follow docs/method.md: the reference code's query view (view 2, the
    x20 CLS) and head averaging, a shared encoder, LoRA rank 16 / alpha 32 on
    the last 9 blocks, 112 px views. `view_spec` (patch geometry, views,
    normalisation) defaults to the backbone's (`backbones.BACKBONES`);
    `prototype_rule` is phase 2's K and L rule. `neighbour_smoothing`: the
    smoothing of the predictions over each spot's neighbours that export writes
    into the bundle's manifest (None: none; it changes no weights).
    """

    genes: list[str] = field(default_factory=list)
    backbone: str = "tiny"
    backbone_weights: str = ""  # local file with UNI weights; empty = random init
    view_spec: ViewSpec | None = None  # None: the backbone's default
    prototype_rule: PrototypeRule = field(default_factory=PrototypeRule)
    shared_encoder: bool = True
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_last_blocks: int = 9  # LoRA on the last n transformer blocks; 0 = none
    lora_targets: str = r"attn\.(qkv|proj)"  # module names inside a block (regex)
    query_view: int = 2  # reference code: the x20 CLS queries views 0 and 1
    ref_view: int = 0  # the view whose CLS the magnification loss aligns f with
    attn_heads: int = 8
    attn_head_dim: int = 64
    dropout: float = 0.2
    mag_loss: str = "contrastive"  # "cosine" | "contrastive"
    mag_weight: float = 0.1
    mag_margin: float = 0.2
    head_average: str = "reference"  # "reference": (y1 + MLP3(h))/2, "paper": Eq. 9
    neighbour_smoothing: NeighbourSmoothing | None = None

    def __post_init__(self) -> None:
        if self.view_spec is None:
            b = BACKBONES.get(self.backbone)
            self.view_spec = b.view_spec() if b is not None else ViewSpec()  # validate() names a bad backbone

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def embed_dim(self) -> int:
        """Width of the backbone's embeddings: of `f`, of the prototypes."""
        return get_backbone(self.backbone).embed_dim

    def validate(self) -> None:
        """UserError naming the first field that is wrong (string fields: with the known values)."""
        backbone = get_backbone(self.backbone)
        if not self.genes:
            raise UserError("genes must not be empty")
        n = self.view_spec.n_views
        if not 0 <= self.query_view < n or not 0 <= self.ref_view < n:
            raise UserError(f"query_view and ref_view must index one of the {n} views")
        check_choice("mag_loss", self.mag_loss, MAG_LOSSES)
        check_choice("head_average", self.head_average, HEAD_AVERAGES)
        if self.neighbour_smoothing is not None:
            self.neighbour_smoothing.validate()
        try:
            re.compile(self.lora_targets)
        except re.error as e:
            raise UserError(f"lora_targets must be a regular expression of module names, e.g. "
                            f"{MMAPConfig.lora_targets!r}; got {self.lora_targets!r} ({e})") from None
        size, patch = self.view_spec.input_size, backbone.patch_size
        if size % patch:
            raise UserError(f"input_size must be a multiple of the patch size {patch}, got {size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, str, numbers): what a checkpoint stores."""
        d = asdict(self)
        for key in ("crop_fractions", "mean", "std"):
            d["view_spec"][key] = list(d["view_spec"][key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MMAPConfig":
        """The config of a checkpoint, nested or (older checkpoints) flat."""
        d = dict(d)
        flat_view = {k: d.pop(k) for k in _FLAT_VIEW_FIELDS if k in d}
        flat_rule = {k: d.pop(k) for k in _FLAT_RULE_FIELDS if k in d}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown config fields {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))} "
                            "(a checkpoint from a newer mmap-train? update mmap-train)")
        view = dict(d.get("view_spec") or {}, **flat_view)
        rule = dict(d.get("prototype_rule") or {}, **flat_rule)
        for key in ("crop_fractions", "mean", "std"):
            if key in view:
                view[key] = tuple(view[key])
        backbone = get_backbone(d.get("backbone", cls.backbone))
        d["view_spec"] = backbone.view_spec(**view)
        d["prototype_rule"] = PrototypeRule(**rule)
        if isinstance(d.get("neighbour_smoothing"), dict):
            d["neighbour_smoothing"] = NeighbourSmoothing(**d["neighbour_smoothing"])
        cfg = cls(**d)
        cfg.validate()
        return cfg
