"""`mmap-export CHECKPOINT -o BUNDLE_DIR`: turn a training checkpoint into a model bundle."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
@click.option("--demo", is_flag=True, help="Mark the bundle as a demo model (the runtime says so).")
def main(checkpoint: Path, out_dir: Path, overwrite: bool, demo: bool) -> None:
    """Export CHECKPOINT (from mmap-train) as encoder.onnx + fusion.onnx + manifest.json.

    LoRA adapters are merged into plain weights and LayerScale is folded, so the
    runtime needs neither peft nor torch.
    """
    if not checkpoint.is_file():
        raise click.UsageError(f"{checkpoint}: checkpoint not found; pass a .pt file written by mmap-train")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise click.UsageError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    from .bundle_writer import export_bundle

    t0 = time.perf_counter()
    manifest = export_bundle(checkpoint, out_dir, demo=demo, overwrite=overwrite)
    sizes = ", ".join(f"{f.path} {(out_dir / f.path).stat().st_size / 1e6:.1f} MB" for f in manifest.files)
    click.echo(f"wrote {out_dir} ({sizes}) in {time.perf_counter() - t0:.1f} s", err=True)


if __name__ == "__main__":
    sys.exit(main())
