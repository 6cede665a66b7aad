"""Deployable forms of the model: LoRA merged, LayerScale folded, preprocessing in the graph."""

from __future__ import annotations

import torch
from mmap_train.model import MMAP
from torch import nn

from mmap_deploy.model.preprocess import ViewSpec


def merge_lora(model: MMAP) -> MMAP:
    """Fold every peft LoRA adapter into plain weights (peft's merge_and_unload), in place."""
    from peft import PeftModel

    bbs = model.encoder.backbones
    for i, bb in enumerate(bbs):
        if isinstance(bb, PeftModel):
            bbs[i] = bb.merge_and_unload()
    return model


@torch.no_grad()
def fold_layerscale(model: MMAP) -> MMAP:
    """Fold each block's LayerScale into the linear layer before it, in place.

    `ls(x) = gamma * x` after `attn.proj` and `mlp.fc2`, so scaling those
    layers' output rows by gamma gives the same function with two fewer
    multiplies per block, and keeps tiny gammas (1e-5) out of fp16 activations.
    """
    from timm.layers import LayerScale

    for bb in model.encoder.backbones:
        for blk in getattr(bb, "blocks", []):
            for ls_name, linear in (("ls1", blk.attn.proj), ("ls2", blk.mlp.fc2)):
                ls = getattr(blk, ls_name)
                if isinstance(ls, LayerScale):
                    linear.weight.mul_(ls.gamma[:, None])
                    if linear.bias is not None:
                        linear.bias.mul_(ls.gamma)
                    setattr(blk, ls_name, nn.Identity())
    return model


def deployable(model: MMAP) -> MMAP:
    """The eval-mode model with LoRA merged and LayerScale folded."""
    return fold_layerscale(merge_lora(model)).eval()


class EncoderGraph(nn.Module):
    """uint8 views (B, V, S, S, 3), NHWC as read from the slide -> f (B, D), y1 (B, G).

    Normalisation is inside the graph: the runtime moves 4x fewer bytes.
    """

    def __init__(self, model: MMAP, spec: ViewSpec):
        super().__init__()
        self.encoder = model.encoder
        mean = torch.tensor(spec.mean, dtype=torch.float32) * 255.0
        inv_std = 1.0 / (torch.tensor(spec.std, dtype=torch.float32) * 255.0)
        self.register_buffer("mean", mean.reshape(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", inv_std.reshape(1, 1, 3, 1, 1), persistent=False)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = views.permute(0, 1, 4, 2, 3).to(torch.float32)
        x = (x - self.mean) * self.inv_std
        f, y1, _ = self.encoder(x)
        return f, y1


class FusionGraph(nn.Module):
    """f (B, D), bank (B, L, D), mask (B, L) bool, y1 (B, G) -> prediction (B, G)."""

    def __init__(self, model: MMAP):
        super().__init__()
        self.fusion = model.fusion

    def forward(self, f, bank, mask, y1):
        y, _ = self.fusion(f, bank, mask, y1)
        return y
