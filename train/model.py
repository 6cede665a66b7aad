"""The MMAP model: one definition used by training, export and the parity tests.

Phase 1 (`MagnificationEncoder`): a ViT encodes each magnification view; a
cross-magnification attention lets one view's CLS attend over the other views'
patch tokens, giving the fused embedding `f`; `y1` averages a head on `f` and a
head on the highest-magnification CLS.

Phase 2 (`FusionHead`): `f` attends over its prototype bank (padded and masked)
giving `h`; the final prediction averages `y1` and a head on `h`.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmap_deploy.atomic import atomic_path
from mmap_deploy.errors import UserError, first_line

from .backbones import Backbone, check_weights_file, get_backbone
from .config import MMAPConfig

log = logging.getLogger(__name__)

# Large enough to zero a softmax weight, small enough to survive fp16 (max 65504).
MASK_VALUE = -30000.0

def build_backbone(cfg: MMAPConfig, weights: str | Path | None = None) -> nn.Module:
    """A timm ViT at the model's fixed input size, with LayerScale (init 1e-5) as in UNI.

    The position table is built for the input grid (e.g. 7x7 at 112 px). UNI's
    224 px table (14x14) is resampled once on load: what `dynamic_img_size=True`
    does on every forward, done ahead so the exported graph has a fixed size.
    """
    import timm

    b = get_backbone(cfg.backbone)
    model = timm.create_model(
        b.timm_name, pretrained=False, num_classes=0, img_size=cfg.view_spec.input_size,
        patch_size=b.patch_size, embed_dim=b.embed_dim, depth=b.depth, num_heads=b.heads, init_values=1e-5,
    )
    if weights:
        load_backbone_weights(model, weights, b)
    elif cfg.backbone == "uni":
        warnings.warn(
            "UNI backbone with RANDOM weights (no --backbone-weights file given): "
            "fine for tests and benchmarks, useless for predictions",
            stacklevel=2,
        )
    return model


def load_backbone_weights(model: nn.Module, path: str | Path, backbone: Backbone | None = None) -> None:
    """Load ViT weights (e.g. UNI's pytorch_model.bin or .safetensors) from a local file.

    The state dict goes through timm's own ViT checkpoint filter, what
    `timm.create_model(pretrained_cfg_overlay=dict(file=...))` applies: it
    unwraps `model`/`state_dict` containers and resamples `pos_embed` (UNI's
    224 px grid, 14x14) to the model's input grid (7x7 at 112 px). Read as
    data only (`weights_only`). A file that is missing, unreadable, not a state
    dict, or whose keys or shapes do not fit the backbone is a one-line
    UserError that names the keys and the fix.
    """
    # Not `create_model(pretrained=True, pretrained_cfg_overlay=dict(file=path))` itself (timm 1.0.31):
    # with num_classes=0, unlike the pretrained config's 1000, timm loads non-strictly and only logs
    # missing and unexpected keys, so a file for another depth or an mmap-train checkpoint would
    # "load" and leave random blocks; and a list, a shape mismatch or a pickled object come out as
    # AttributeError, a two-line RuntimeError or advice to pass weights_only=False. Its filter is used
    # here as it is; the checks and messages are ours.
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = check_weights_file(path)
    arch = (f"the {backbone.name} backbone ({backbone.timm_name}: {backbone.depth} blocks, width {backbone.embed_dim})"
            if backbone else "the backbone")
    fix = ("pass a state dict of that ViT's weights (--backbone uni: UNI's pytorch_model.bin), "
           "or choose the --backbone the weights are for")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's own message advises weights_only=False: not for a user
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(f"{path}: refused: not a file of tensors only (it holds pickled objects{what}, or is "
                        f"damaged), so it is not loaded; {fix}") from None
    except Exception as e:  # a truncated or foreign file: torch and safetensors raise many kinds
        raise UserError(f"{path}: cannot read backbone weights ({first_line(e, with_type=True)}); {fix}") from None
    if isinstance(state, dict) and "config" in state and "state_dict" in state:
        raise UserError(f"{path}: an mmap-train checkpoint, not backbone weights (it goes to features "
                        f"--checkpoint or phase2 --init); {fix}")
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        what = (f"a {type(state).__name__}" if not isinstance(state, dict)
                else "a dict that does not map names to tensors")
        raise UserError(f"{path}: not a state dict (names to tensors) but {what}; {fix}")
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as e:  # e.g. a pos_embed whose token count is no square grid
        raise UserError(f"{path}: these weights do not fit {arch} ({first_line(e, with_type=True)}); {fix}") from None
    problem = _weights_mismatch(model, state)
    if problem:
        raise UserError(f"{path}: these weights do not fit {arch}: {problem}; {fix}")
    model.load_state_dict(state, strict=False)


def _weights_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """What keeps `state` from loading into `model` (missing, unexpected, reshaped keys), or ''.

    The classifier (`head.*`) is neither needed nor used: the backbone gives embeddings.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    unexpected = [k for k in state if k not in own and not k.startswith("head.")]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
              for k in state if k in own and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_some(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} key(s) of another shape ({_some(shapes)})")
    if missing and unexpected:
        prefix = _common_prefix(unexpected, set(own))
        if prefix:
            parts.append(f"the file's keys start with {prefix!r}: save the state dict without it")
    return ", ".join(parts)


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _common_prefix(keys: list[str], own: set[str]) -> str:
    """The prefix (e.g. 'module.') that, stripped from every key in `keys`, names keys of `own`; '' if none."""
    first = keys[0]
    for i in range(1, len(first)):
        if first[i - 1] == "." and first[i:] in own:
            prefix = first[:i]
            if all(k.startswith(prefix) for k in keys):
                return prefix
    return ""


def add_lora(backbone: nn.Module, cfg: MMAPConfig) -> nn.Module:
    """Wrap a ViT with peft LoRA on the last `cfg.lora_last_blocks` blocks.

    Targets are a full-name regex (`blocks\\.N\\.attn\\.(qkv|proj)`): the bare
    name `proj` would also match `patch_embed.proj`, a Conv2d.
    """
    from peft import LoraConfig, get_peft_model

    depth = len(backbone.blocks)
    n = min(cfg.lora_last_blocks, depth)
    blocks = "|".join(str(i) for i in range(depth - n, depth))
    lora = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
        target_modules=rf"blocks\.({blocks})\.{cfg.lora_targets}",
    )
    return get_peft_model(backbone, lora)


class CrossAttention(nn.Module):
    """Pre-norm multi-head attention of one query vector over a context sequence.

    As in the reference: no residual, no feed-forward; dropout on the attention
    weights and the output. `mask` (B, N) marks valid context entries (True).
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64, dropout: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm = norm_layer(dim)
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(dim, 2 * inner, bias=False)
        self.proj = nn.Linear(inner, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.out_drop = nn.Dropout(dropout)
        self.scale = head_dim ** -0.5

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The projected query (B, heads, 1, head_dim) of query vectors x (B, D)."""
        return self.q(self.norm(x)).reshape(x.shape[0], self.heads, 1, self.head_dim)

    def key_value(self, context: torch.Tensor) -> torch.Tensor:
        """Keys and values (..., 2 * heads * head_dim) of context rows, each row on its own.

        Normalisation and projection act row by row, so rows shared by many
        contexts (phase 2's centroids) can be projected once and gathered.
        """
        return self.kv(self.norm(context))

    def attend(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected queries `q` attending over projected context rows `kv` (B, N, 2 * heads * head_dim)."""
        b, n, _ = kv.shape
        h, d = self.heads, self.head_dim
        kv = kv.reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        scores = (q * self.scale) @ k.transpose(-1, -2)  # (B, H, 1, N)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], MASK_VALUE)
        attn = self.attn_drop(scores.softmax(dim=-1))
        out = (attn @ v).reshape(b, h * d)
        return self.out_drop(self.proj(out))

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # query before keys/values: the order of the exported graph's nodes and of gradient accumulation
        q = self.query(query)
        return self.attend(q, self.key_value(context), mask)


class MagnificationEncoder(nn.Module):
    """Phase 1: views (B, V, 3, S, S), normalised float -> f (B, D), y1 (B, G), CLS (B, V, D)."""

    def __init__(self, cfg: MMAPConfig, backbone_weights: str | Path | None = None):
        super().__init__()
        self.n_views = cfg.view_spec.n_views
        self.query_view = cfg.query_view
        self.detail_view = self.n_views - 1  # the highest magnification: e^(2) in the paper
        n_backbones = 1 if cfg.shared_encoder else self.n_views
        backbones = []
        for _ in range(n_backbones):
            bb = build_backbone(cfg, backbone_weights)
            if cfg.lora_last_blocks > 0:
                bb = add_lora(bb, cfg)
            backbones.append(bb)
        self.backbones = nn.ModuleList(backbones)
        dim = cfg.embed_dim
        self.cross_attn = CrossAttention(dim, cfg.attn_heads, cfg.attn_head_dim, cfg.dropout)
        self.head_f = nn.Linear(dim, cfg.n_genes)  # MLP_a(f)
        self.head_detail = nn.Linear(dim, cfg.n_genes)  # MLP_b(e^(2))

    def tokens(self, views: torch.Tensor) -> torch.Tensor:
        """Token sequences (B, V, T, D) of every view ([CLS, patch tokens])."""
        b, v = views.shape[:2]
        if len(self.backbones) == 1:
            tok = self.backbones[0].forward_features(views.flatten(0, 1))
            return tok.reshape(b, v, *tok.shape[1:])
        return torch.stack([bb.forward_features(views[:, i]) for i, bb in enumerate(self.backbones)], dim=1)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = self.tokens(views)
        cls = tok[:, :, 0]
        query = cls[:, self.query_view]
        others = [tok[:, i, 1:] for i in range(self.n_views) if i != self.query_view]
        context = torch.cat([query[:, None], *others], dim=1)
        f = self.cross_attn(query, context)
        y1 = (self.head_f(f) + self.head_detail(cls[:, self.detail_view])) / 2
        return f, y1, cls


class FusionHead(nn.Module):
    """Phase 2: f (B, D), bank (B, L, D), mask (B, L) bool, y1 (B, G) -> y (B, G), h (B, D).

    `head_average="reference"`: y = (y1 + MLP3(h)) / 2 (the reference code).
    `head_average="paper"`: Eq. 9, y = (MLP1(e2) + MLP2(f) + MLP3(h)) / 3 with
    MLP1, MLP2 the frozen phase-1 heads, so MLP1(e2) + MLP2(f) = 2 * y1.
    """

    def __init__(self, cfg: MMAPConfig, dim: int):
        super().__init__()
        self.head_average = cfg.head_average
        self.attn = CrossAttention(dim, cfg.attn_heads, cfg.attn_head_dim, cfg.dropout)
        self.head_h = nn.Linear(dim, cfg.n_genes)  # MLP3(h)

    def forward(self, f: torch.Tensor, bank: torch.Tensor, mask: torch.Tensor, y1: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        context = torch.cat([f[:, None], bank], dim=1)
        full_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        h = self.attn(f, context, full_mask)
        return self._predict(y1, h), h

    def forward_shared(self, f: torch.Tensor, centroids: torch.Tensor, bank_idx: torch.Tensor, mask: torch.Tensor,
                       y1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward(f, centroids[bank_idx], mask, y1)`, projecting keys/values once per centroid.

        The training fast path (tests hold it equal to `forward`, dropout
        included): the banks of a batch are gathered from a few hundred
        centroids, so projecting those instead of every (spot, bank slot)
        copy of them is about 5x less work per step.
        """
        q = self.attn.query(f)
        kv = torch.cat([self.attn.key_value(f)[:, None], self.attn.key_value(centroids)[bank_idx]], dim=1)
        full_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        h = self.attn.attend(q, kv, full_mask)
        return self._predict(y1, h), h

    def _predict(self, y1: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.head_average == "reference":
            return (y1 + self.head_h(h)) / 2
        return (2 * y1 + self.head_h(h)) / 3


class MMAP(nn.Module):
    """Both phases in one module, with its config: what a checkpoint holds."""

    def __init__(self, cfg: MMAPConfig, backbone_weights: str | Path | None = None):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = MagnificationEncoder(cfg, backbone_weights)
        self.fusion = FusionHead(cfg, cfg.embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim


# -- losses ----------------------------------------------------------------
def cosine_alignment_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(a_i, b_i) (the paper's L_mag)."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def contrastive_alignment_loss(a: torch.Tensor, b: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Batch-contrastive variant (the reference code's): pull matching pairs together
    (1 - cos on the diagonal), push other pairs below `margin` cosine (hinge)."""
    sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    n = sim.shape[0]
    pos = (1 - sim.diagonal()).mean()
    if n < 2:
        return pos
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    neg = F.relu(sim[off] - margin).mean()
    return pos + neg


def alignment_loss(cfg: MMAPConfig, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if cfg.mag_loss == "cosine":
        return cosine_alignment_loss(a, b)
    return contrastive_alignment_loss(a, b, cfg.mag_margin)


# -- checkpoints -----------------------------------------------------------
def plain(value: Any, where: str = "checkpoint") -> Any:
    """`value` as checkpoint data: dicts, lists, tuples, str, numbers, bools, None and tensors only.

    numpy scalars and arrays become Python numbers and tensors, paths become
    strings; anything else (an object, a function) is a bug and raises, so
    that every checkpoint loads with `torch.load(weights_only=True)`.
    """
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where}: {type(value).__name__} is not checkpoint data (dicts, lists, str, numbers, tensors)")


def save_checkpoint(path: str | Path, model: MMAP, **extra) -> None:
    """Write {config, state_dict, **extra} atomically; `extra` holds plain data only (see `plain`)."""
    extra = plain(extra)
    with atomic_path(Path(path)) as tmp:
        torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), **extra}, tmp)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file as data, never as code: UserError for a file that is not one.

    `torch.load(weights_only=True)` unpickles only tensors and plain
    containers, so a checkpoint received from someone else cannot run code
    here; one that carries any other pickled object is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; pass a .pt file written by mmap-train")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(f"{path}: refused: the checkpoint carries pickled objects{what}, not only data; "
                        "mmap-train checkpoints hold only tensors, dicts, lists, strings and numbers, "
                        "so this file was not written by it or was altered; do not load it") from None
    except Exception as e:  # a truncated or foreign file: torch raises many kinds
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}); "
                        "pass a .pt file written by mmap-train") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path}: not an mmap-train checkpoint (no config/state_dict)")
    return ckpt


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[MMAP, dict]:
    """Rebuild the model from a checkpoint's config and load its weights (no backbone file needed)."""
    ckpt = read_checkpoint(path, map_location)
    cfg = MMAPConfig.from_dict(ckpt["config"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init warning: weights come from the checkpoint
        model = MMAP(cfg)
    state = ckpt["state_dict"]
    if ckpt.get("encoder_trained") is False and not any(k.startswith("encoder.") for k in state):
        # phase 2 trained from a feature cache alone: only the fusion head is real;
        # the encoder keeps its random init (and the warning says so)
        warnings.warn(f"{path}: checkpoint has no trained encoder (phase 2 from cached features); "
                      "its encoder is randomly initialised", stacklevel=2)
        model.fusion.load_state_dict({k[len("fusion."):]: v for k, v in state.items() if k.startswith("fusion.")})
    else:
        model.load_state_dict(state)
    return model, ckpt
