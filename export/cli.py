"""`mmap-export [CHECKPOINT] -o BUNDLE_DIR [--fp16] [--int8] [--tensorrt]`: make or extend a model bundle."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from mmap_deploy.messages import echo, run_cli


def _default_parity_data() -> Path | None:
    env = os.environ.get("MMAP_DATA_DIR")
    return Path(env) if env else None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle directory to write (or, without CHECKPOINT, an existing bundle to add files to).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
@click.option("--demo", is_flag=True, help="Mark the bundle as a demo model (the runtime says so).")
@click.option("--fp16", is_flag=True, help="Add encoder.fp16.onnx and fusion.fp16.onnx (for GPUs), with parity vs fp32.")
@click.option("--int8", is_flag=True, help="Add encoder.int8.onnx (ONNX Runtime dynamic quantisation, for CPUs).")
@click.option("--tensorrt", is_flag=True,
              help="Build TensorRT engines for THIS GPU and TensorRT version (needs an NVIDIA GPU and tensorrt).")
@click.option("--trt-precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Which ONNX files the engines are built from (strongly typed networks).")
@click.option("--trt-batch", default="1,32,128", show_default=True, metavar="MIN,OPT,MAX",
              help="Optimisation profile for the batch axis (spots per engine call).")
@click.option("--trt-workspace-gib", type=click.FloatRange(min=0.0625), default=4.0, show_default=True,
              help="Cap on the TensorRT builder's workspace memory.")
@click.option("--trt-timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Timing cache file (read and updated). Default: tensorrt.timing-cache in the bundle.")
@click.option("--parity-data", type=click.Path(file_okay=False, path_type=Path), default=_default_parity_data,
              help="Folder holding her2st/ (images/*.jpg, spots/*_selection.tsv): parity on real patches. "
                   "Default: $MMAP_DATA_DIR; without it, random views (the manifest says which).")
@click.option("--min-cosine", type=click.FloatRange(-1.0, 1.0), default=None,
              help="Smallest accepted output cosine vs fp32 (default: 0.999 for fp16, 0.99 for int8).")
@click.option("--familiarity", type=click.Path(dir_okay=False, path_type=Path),
              help="A training summary (familiarity.npz from mmap-train phase2) to put into the bundle, in place of "
                   "the one the checkpoint records. Default: the checkpoint's, if it records one.")
def main(**options: Any) -> None:
    """Export CHECKPOINT (from mmap-train) as encoder.onnx + fusion.onnx + manifest.json.

    LoRA adapters are merged into plain weights and LayerScale is folded, so the
    runtime needs neither peft nor torch. --fp16, --int8 and --tensorrt add
    reduced-precision files and engines, to the new bundle or, without
    CHECKPOINT, to the existing bundle at -o. TensorRT engines are built for
    the GPU and TensorRT version they are built on; run --tensorrt there.
    The training summary behind familiarity (OUT/familiarity.npz of mmap-train
    phase2, beside the checkpoint) goes into the bundle with it.
    """
    from mmap_train import missing_train_extra

    run_cli(lambda: _main(**options), missing_extra=missing_train_extra)


def _main(*, checkpoint: Path | None, out_dir: Path, overwrite: bool, demo: bool, fp16: bool, int8: bool,
          tensorrt: bool, trt_precision: str, trt_batch: str, trt_workspace_gib: float,
          trt_timing_cache: Path | None, parity_data: Path | None, min_cosine: float | None,
          familiarity: Path | None) -> None:
    from mmap_deploy.errors import UserError

    t0 = time.perf_counter()
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise click.UsageError(f"{checkpoint}: checkpoint not found; pass a .pt file written by mmap-train")
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise click.UsageError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    elif not (fp16 or int8 or tensorrt or familiarity):
        raise click.UsageError("give CHECKPOINT to export, or --fp16/--int8/--tensorrt/--familiarity to add files to "
                               "the bundle at -o")
    elif overwrite or demo:
        raise click.UsageError("--overwrite and --demo apply when exporting a CHECKPOINT")
    elif not (out_dir / "manifest.json").is_file():
        raise click.UsageError(f"{out_dir}: no model bundle here (no manifest.json); pass -o a bundle written by "
                               "mmap-export, or give a CHECKPOINT to export")
    batch = None
    if tensorrt:
        from .tensorrt_build import BatchProfile

        batch = BatchProfile.parse(trt_batch)  # a bad profile fails before any work
        from mmap_deploy.engines.tensorrt import current_target

        try:
            current_target()  # no TensorRT or no GPU: say so before exporting anything
        except UserError as e:
            cause = str(e).split(";")[0]  # the runtime's advice (its --backend) does not apply here
            raise UserError(f"--tensorrt: {cause}; engines are built for the GPU they will run on: run --tensorrt "
                            "on that machine (pip install '.[tensorrt]' there), or leave it out") from None
    if familiarity is not None and not familiarity.is_file():
        raise UserError(f"{familiarity}: --familiarity file not found; pass the familiarity.npz that mmap-train "
                        "phase2 wrote")
    if parity_data is not None and not parity_data.is_dir():
        raise UserError(f"{parity_data}: --parity-data folder not found; pass the folder that holds her2st/")

    if checkpoint is not None:
        from .bundle_writer import export_bundle

        export_bundle(checkpoint, out_dir, demo=demo, overwrite=overwrite, familiarity=familiarity)
        echo(f"exported {out_dir} in {time.perf_counter() - t0:.1f} s")
    from mmap_deploy.model.bundle import load_bundle

    # One bundle object through every step: each model file is hashed once, when first used.
    bundle = load_bundle(out_dir)  # checks the bundle before adding to it
    if familiarity is not None and checkpoint is None:
        from .bundle_writer import add_familiarity

        sf = add_familiarity(bundle.manifest, bundle.root, familiarity)
        bundle.write_manifest()
        echo(f"familiarity: {sf.path} ({sf.about.get('n_centroids', '?')} centroids of "
             f"{sf.about.get('n_train_spots', '?')} training spots) added to {out_dir}")
    need_fp16 = fp16 or (tensorrt and trt_precision == "fp16"
                         and bundle.manifest.model_file("encoder", "fp16") is None)
    reference = None
    if need_fp16 or int8 or tensorrt:
        from .parity import ParityReference

        # the parity inputs and the fp32 outputs on them, made once for every file added
        reference = ParityReference.build(bundle, parity_data)
    if need_fp16:
        from .parity import FP16_MIN_COSINE
        from .reduced import add_fp16

        t = time.perf_counter()
        res = add_fp16(bundle, min_cosine=FP16_MIN_COSINE if min_cosine is None else min_cosine,
                       reference=reference)
        echo(f"fp16: encoder cosine {res['encoder']['cosine_min']:.6f}, fusion cosine "
              f"{res['fusion']['cosine_min']:.6f} vs fp32 ({time.perf_counter() - t:.1f} s)")
    if int8:
        from .parity import INT8_MIN_COSINE
        from .reduced import add_int8

        t = time.perf_counter()
        res8 = add_int8(bundle, min_cosine=INT8_MIN_COSINE if min_cosine is None else min_cosine,
                        reference=reference)
        echo(f"int8: encoder cosine {res8['cosine_min']:.6f} vs fp32 ({time.perf_counter() - t:.1f} s)")
    if tensorrt:
        from .tensorrt_build import add_tensorrt

        res_trt = add_tensorrt(bundle, precision=trt_precision, batch=batch, workspace_gib=trt_workspace_gib,
                               timing_cache=trt_timing_cache, reference=reference)
        for role, r in res_trt.items():
            echo(f"tensorrt {trt_precision} {role}: built in {r['seconds']:.1f} s for {r['target']['gpu']} "
                  f"(sm {r['target']['compute_capability']}, TensorRT {r['target']['tensorrt']}), "
                  f"cosine {r['parity']['cosine_min']:.6f} vs fp32")
    listed = [f.path for f in bundle.manifest.files] + ([bundle.manifest.familiarity.path]
                                                         if bundle.manifest.familiarity is not None else [])
    sizes = ", ".join(f"{p} {(out_dir / p).stat().st_size / 1e6:.1f} MB" for p in listed)
    echo(f"wrote {out_dir} ({sizes}) in {time.perf_counter() - t0:.1f} s")

if __name__ == "__main__":
    sys.exit(main())
