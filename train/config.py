"""The model configuration: saved in every checkpoint, read by export."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mmap_deploy.preprocess import DEFAULT_CROP_FRACTIONS, DEFAULT_MPP, DEFAULT_PATCH_UM, ViewSpec
from mmap_deploy.prototypes import PrototypeRule

BACKBONES = ("tiny", "small", "uni")  # tiny: tests and CPU demos; small: ViT-S/16; uni: ViT-L/16


@dataclass
class MMAPConfig:
    """Everything that defines an MMAP model's architecture and preprocessing.

    Defaults follow method.md: the reference code's query view (view 2, the
    x20 CLS) and head averaging, a shared encoder, LoRA rank 16 / alpha 32 on
    the last 9 blocks, 112 px views.
    """

    genes: list[str] = field(default_factory=list)
    backbone: str = "tiny"
    backbone_weights: str = ""  # local file with UNI weights; empty = random init
    input_size: int = 112
    patch_um: float = DEFAULT_PATCH_UM
    mpp: float = DEFAULT_MPP
    crop_fractions: tuple[float, ...] = DEFAULT_CROP_FRACTIONS
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
    k_min: int = 32
    k_max: int = 80
    k_divisor: int = 5
    l_ratio: float = 0.5
    l_fixed: int = 0

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def view_spec(self) -> ViewSpec:
        return ViewSpec(
            patch_um=self.patch_um, mpp=self.mpp, input_size=self.input_size,
            crop_fractions=tuple(self.crop_fractions),
        )

    @property
    def prototype_rule(self) -> PrototypeRule:
        return PrototypeRule(self.k_min, self.k_max, self.k_divisor, self.l_ratio, self.l_fixed)

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if not self.genes:
            raise ValueError("genes must not be empty")
        n = len(self.crop_fractions)
        if not 0 <= self.query_view < n or not 0 <= self.ref_view < n:
            raise ValueError(f"query_view and ref_view must index one of the {n} views")
        if self.mag_loss not in ("cosine", "contrastive"):
            raise ValueError(f"mag_loss must be 'cosine' or 'contrastive', got {self.mag_loss!r}")
        if self.head_average not in ("reference", "paper"):
            raise ValueError(f"head_average must be 'reference' or 'paper', got {self.head_average!r}")
        if self.input_size % 16:
            raise ValueError(f"input_size must be a multiple of the patch size 16, got {self.input_size}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_fractions"] = list(self.crop_fractions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MMAPConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        d = dict(d)
        if "crop_fractions" in d:
            d["crop_fractions"] = tuple(d["crop_fractions"])
        cfg = cls(**d)
        cfg.validate()
        return cfg
