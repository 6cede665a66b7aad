"""Checkpoint -> model bundle: encoder.onnx, fusion.onnx, manifest.json, and the training summary.

The training summary behind familiarity (`familiarity.npz`) is the one
`mmap-train phase2` wrote beside the checkpoint and recorded in it (file name
and sha256): export copies it into the bundle and lists it in the manifest
with its hash. A checkpoint that records none makes a bundle without one.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from mmap_train.model import MMAP, load_checkpoint

from mmap_deploy import __version__
from mmap_deploy.errors import UserError
from mmap_deploy.messages import command_line
from mmap_deploy.model.bundle import Bundle, Manifest, ModelFile, SummaryFile, sha256_file
from mmap_deploy.model.familiarity import SUMMARY_NAME, read_summary

from .graphs import EncoderGraph, FusionGraph, deployable

log = logging.getLogger(__name__)

OPSET = 18
ENCODER_INPUTS = ["views"]
ENCODER_OUTPUTS = ["f", "y1"]
FUSION_INPUTS = ["f", "bank", "mask", "y1"]
FUSION_OUTPUTS = ["prediction"]


def example_inputs(model: MMAP, batch: int = 2, bank: int = 3) -> dict[str, tuple[torch.Tensor, ...]]:
    """Deterministic example inputs of the right shapes and dtypes for both graphs."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    s, v, d = cfg.view_spec.input_size, cfg.view_spec.n_views, model.embed_dim
    views = torch.randint(0, 256, (batch, v, s, s, 3), dtype=torch.uint8, generator=g)
    f = torch.randn(batch, d, generator=g)
    mask = torch.ones(batch, bank, dtype=torch.bool)
    return {
        "encoder": (views,),
        "fusion": (f, torch.randn(batch, bank, d, generator=g), mask, torch.randn(batch, cfg.n_genes, generator=g)),
    }


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]], external_data: bool | None = None) -> None:
    """torch.onnx (dynamo) export to `path` (weights beside it in `<name>.data` when over 2 GB)."""
    from torch.export import Dim

    dims: dict[str, Any] = {}
    named = {}
    for name in inputs:
        axes = dynamic.get(name, {})
        named[name] = {ax: dims.setdefault(label, Dim(label, min=1, max=65536)) for ax, label in axes.items()} or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, args, dynamo=True, input_names=inputs, output_names=outputs,
            dynamic_shapes=tuple(named[n] for n in inputs), opset_version=OPSET,
            optimize=True, verbose=False,
        )
    # A single file up to protobuf's 2 GB limit; above it (or when asked) the
    # weights go to `<name>.data` beside it, which the manifest then lists.
    prog.save(str(path), external_data=external_data)


def export_onnx(model: MMAP, out_dir: Path, external_data: bool | None = None) -> dict[str, Path]:
    """Export the deployable model's two graphs into `out_dir`.

    `external_data`: None saves weights inside each .onnx file unless a graph is
    over 2 GB; True always writes them to `<name>.data` beside it.
    """
    model = deployable(model)
    ex = example_inputs(model)
    enc_path, fus_path = out_dir / "encoder.onnx", out_dir / "fusion.onnx"
    with torch.no_grad():
        _export(EncoderGraph(model, model.config.view_spec).eval(), ex["encoder"], enc_path,
                ENCODER_INPUTS, ENCODER_OUTPUTS, {"views": {0: "batch"}}, external_data)
        _export(FusionGraph(model).eval(), ex["fusion"], fus_path, FUSION_INPUTS, FUSION_OUTPUTS,
                {"f": {0: "batch"}, "bank": {0: "batch", 1: "bank"}, "mask": {0: "batch", 1: "bank"},
                 "y1": {0: "batch"}}, external_data)
    return {"encoder": enc_path, "fusion": fus_path}


def manifest_for(model: MMAP, provenance: dict[str, Any], demo: bool = False) -> Manifest:
    cfg = model.config
    return Manifest(
        genes=list(cfg.genes), embed_dim=model.embed_dim, view=cfg.view_spec,
        prototypes=cfg.prototype_rule, query_view=cfg.query_view, head_average=cfg.head_average,
        backbone=cfg.backbone, provenance=provenance, demo=demo, neighbours=cfg.neighbour_smoothing,
    )


def add_file(manifest: Manifest, bundle_dir: Path, role: str, path: Path, precision: str = "fp32",
             fmt: str = "onnx", target: dict | None = None, parity: dict | None = None) -> ModelFile:
    """Record a model file (replacing any entry of the same role/precision/format).

    An ONNX file saved with external data (`<name>.data` beside it) is recorded
    with that file and its hash too.
    """
    data = path.with_name(path.name + ".data")
    mf = ModelFile(role=role, path=path.relative_to(bundle_dir).as_posix(), sha256=sha256_file(path),
                   precision=precision, format=fmt, target=dict(target or {}), parity=dict(parity or {}),
                   external_data=data.relative_to(bundle_dir).as_posix() if data.is_file() else "",
                   external_sha256=sha256_file(data) if data.is_file() else "")
    manifest.files = [f for f in manifest.files
                      if (f.role, f.precision, f.format) != (role, precision, fmt)] + [mf]
    return mf


def add_to_bundle(bundle: Bundle, role: str, path: Path, **kwargs) -> ModelFile:
    """`add_file` for a loaded bundle: the hash just computed from the new file stands as its check."""
    mf = add_file(bundle.manifest, bundle.root, role, path, **kwargs)
    bundle.add_verified(mf)
    return mf


def add_familiarity(manifest: Manifest, bundle_dir: Path, source: Path) -> SummaryFile:
    """Copy a training summary into the bundle as `familiarity.npz` and list it in `manifest` with its sha256.

    The file is read and checked first (`read_summary`: the format, and that
    its width is the model's embedding width); a bad one is a UserError.
    """
    summary = read_summary(source, manifest.embed_dim)
    dest = bundle_dir / SUMMARY_NAME
    if source.resolve() != dest.resolve():
        shutil.copyfile(source, dest)
    keep = ("method", "n_centroids", "n_train_spots", "calibration_held_out", "calibration_units")
    manifest.familiarity = SummaryFile(SUMMARY_NAME, sha256_file(dest), {k: summary.meta[k] for k in keep
                                                                         if k in summary.meta})
    return manifest.familiarity


def checkpoint_summary(checkpoint: Path, ckpt: dict[str, Any]) -> Path | None:
    """The training summary a checkpoint records (beside it, its hash checked), or None when it records none."""
    record = ckpt.get("familiarity")
    if not record:
        return None
    path = checkpoint.parent / str(record["file"])
    if not path.is_file():
        raise UserError(f"{checkpoint}: its training summary {record['file']} is not beside it ({path}); copy it "
                        "from the training's output folder (mmap-train phase2 --out) next to the checkpoint")
    if sha256_file(path) != record["sha256"]:
        raise UserError(f"{path}: not the training summary written with {checkpoint.name} (sha256 differs from the "
                        "checkpoint's record); copy the one from the same training's output folder")
    return path


def export_bundle(checkpoint: str | Path, out_dir: str | Path, *, demo: bool = False,
                  overwrite: bool = False, external_data: bool | None = None,
                  familiarity: Path | None = None) -> Manifest:
    """Turn a checkpoint into a bundle directory (written to a temp dir, then moved in place).

    The training summary is `familiarity` when given, else the one the checkpoint records (if any).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-trained-encoder warning becomes the error below
        model, ckpt = load_checkpoint(checkpoint)
    if ckpt.get("encoder_trained") is False:
        raise UserError(
            f"{checkpoint}: this checkpoint has no trained encoder (phase 2 trained from cached features "
            "alone), so its bundle would predict from a random encoder; train phase 2 with "
            "--init PHASE1_CHECKPOINT and export that"
        )
    provenance = {
        "mmap_deploy_version": __version__,
        "torch_version": torch.__version__,
        "checkpoint": str(Path(checkpoint).name),
        "checkpoint_sha256": sha256_file(checkpoint),
        "command": command_line(Path(sys.argv[0]).name),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    summary = familiarity if familiarity is not None else checkpoint_summary(Path(checkpoint), ckpt)
    for key in ("phase", "epoch", "training_data", "metrics", "trained"):
        if key in ckpt and ckpt[key] is not None:
            provenance[key] = ckpt[key]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mmap-export-", dir=out_dir.parent))
    try:
        paths = export_onnx(model, tmp, external_data)
        manifest = manifest_for(model, provenance, demo=demo)
        for role, p in paths.items():
            add_file(manifest, tmp, role, p)
        if summary is not None:
            add_familiarity(manifest, tmp, summary)
        manifest.provenance["export_seconds"] = round(time.perf_counter() - t0, 2)
        manifest.write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest

