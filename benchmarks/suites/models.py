"""The models benchmarks run: random-weight MMAPs (speed does not depend on the weights), exported
through the project's own path, and the torch ways of running their encoder that the engines are
compared with."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

N_GENES = 785  # the her2st protocol's gene list


def build_model(backbone: str, seed: int = 0):
    """A random-weight MMAP in eval mode (no LoRA: speed runs)."""
    import torch
    from mmap_train.config import MMAPConfig
    from mmap_train.model import MMAP

    torch.manual_seed(seed)
    cfg = MMAPConfig(genes=[f"GENE{i}" for i in range(N_GENES)], backbone=backbone, lora_last_blocks=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "random UNI weights" warning: intended here
        return MMAP(cfg).eval()


def model_label(backbone: str, cfg) -> str:
    s = cfg.view_spec.input_size
    return {"uni": f"uni-vit-large-patch16-{s}", "tiny": f"tiny-vit-patch16-{s}"}.get(
        backbone, backbone)


def export_model(model, work: Path, precisions: tuple[str, ...]) -> Path:
    """Checkpoint -> bundle with the requested extra precisions (the project's own export path)."""
    from mmap_export.bundle_writer import export_bundle
    from mmap_train.model import save_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "model.pt"
    save_checkpoint(ckpt, model)
    bundle = work / "bundle"
    export_bundle(ckpt, bundle, overwrite=True)
    ckpt.unlink()
    add_precisions(bundle, precisions)
    return bundle


def add_precisions(bundle: Path, precisions: tuple[str, ...], parity_spots: int = 4) -> None:
    """Add the fp16/int8 files a bundle lacks (parity on a few random views: speed runs;
    the parity that matters is measured on real patches by mmap-export and the tests)."""
    from mmap_deploy.model.bundle import load_bundle

    m = load_bundle(bundle, verify_hashes=False).manifest
    if "fp16" in precisions and m.model_file("encoder", "fp16") is None:
        from mmap_export.reduced import add_fp16

        add_fp16(bundle, n_spots=parity_spots)
    if "int8" in precisions and m.model_file("encoder", "int8") is None:
        from mmap_export.reduced import add_int8

        add_int8(bundle, n_spots=parity_spots)


def prepare_model(backbone: str, work: Path, precisions: tuple[str, ...], checkpoint: Path | None = None,
                  bundle: Path | None = None):
    """(torch model, bundle dir) of the same weights: a given checkpoint and its bundle, or a fresh export."""
    if checkpoint is not None and bundle is not None:
        from mmap_train.model import load_checkpoint

        model = load_checkpoint(checkpoint)[0].eval()
        dst = work / backbone / "bundle"
        shutil.copytree(bundle, dst, dirs_exist_ok=True)
        add_precisions(dst, tuple(p for p in precisions if p != "fp32"))
        return model, dst
    model = build_model(backbone)
    return model, export_model(model, work / backbone, tuple(p for p in precisions if p != "fp32"))


def views_for(cfg, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = cfg.view_spec.input_size
    return rng.integers(0, 256, (n, cfg.view_spec.n_views, s, s, 3), dtype=np.uint8)


def torch_encoder_fn(model, views: np.ndarray, device: str = "cpu", dtype: str = "fp32", compiled: bool = False):
    """The reference way: the training model's encoder on normalised float views, eager (or compiled)."""
    import torch

    from mmap_deploy.model.preprocess import normalise

    x = torch.from_numpy(normalise(views, model.config.view_spec)).to(device)
    enc = model.encoder.to(device)
    cast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if compiled:
        enc = torch.compile(enc)

    def run():
        with torch.inference_mode():
            if cast is None:
                out = enc(x)
            else:
                with torch.autocast(device_type=device.split(":")[0], dtype=cast):
                    out = enc(x)
            if device != "cpu":
                torch.cuda.synchronize()
            return out

    return run


def deployable_encoder_fn(model, views: np.ndarray, device: str, dtype: str):
    """The exported graph's torch twin (LoRA merged, LayerScale folded, uint8 NHWC in, normalisation
    inside) fed from host memory every call, outputs copied back: what a deployed GPU engine does."""
    import torch
    from mmap_export.graphs import EncoderGraph, deployable

    graph = EncoderGraph(deployable(model), model.config.view_spec).eval().to(device)
    host = torch.from_numpy(views).pin_memory()
    cast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def run():
        with torch.inference_mode():
            x = host.to(device, non_blocking=True)
            if cast is None:
                f, y1 = graph(x)
            else:
                with torch.autocast(device_type="cuda", dtype=cast):
                    f, y1 = graph(x)
            return f.float().cpu(), y1.float().cpu()

    return run


def tiny_bundle(work: Path) -> Path:
    bundle = work / "tiny" / "bundle"
    if not (bundle / "manifest.json").is_file():
        (work / "tiny").mkdir(parents=True, exist_ok=True)
        export_model(build_model("tiny"), work / "tiny", ())
    return bundle
