"""Build the demo bundle shipped in `mmap_deploy/demo/bundle`: a tiny MMAP trained on her2st.

    python -m mmap_train.make_demo --data-dir ../shared/data --out mmap_deploy/demo/bundle

1. phase 1, tiny backbone (trained in full, 112 px views), on the her2st
   sections that have images: train on five, validate on the sixth;
2. the feature cache of all six sections with the phase-1 checkpoint;
3. phase 2 on that cache, same split, keeping the phase-1 encoder;
4. export with `mmap_export.bundle_writer.export_bundle(..., demo=True)`, with
   the training summary behind familiarity that phase 2 wrote.

`--familiarity-only` adds that summary to an existing demo bundle without
retraining (its model files untouched): the training spots' `f` through the
bundle's own `encoder.onnx` (`add_demo_familiarity`).

A demo: it shows the runtime working end to end on real tissue; its
predictions are weak (a 4-block ViT trained from scratch on about 1 000 spots).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import click

from mmap_deploy.errors import UserError
from mmap_deploy.messages import command_line

log = logging.getLogger(__name__)

DEMO_VAL_SECTION = "C6"


def make_demo(data_dir: str | Path, out: str | Path, work: str | Path, *, epochs: int = 8, phase2_epochs: int = 30,
              val_section: str = DEMO_VAL_SECTION, threads: int = 1, max_steps: int = 0) -> dict:
    """Train both phases on the her2st sections with images and export the demo bundle; returns a summary."""
    from mmap_export.bundle_writer import export_bundle

    from .config import MMAPConfig
    from .datasets import her2st_sections, load_targets, read_genes, split_sections
    from .features import compute_features, read_cache
    from .phase1 import Phase1Recipe, load_spot_set, train_phase1
    from .phase2 import Phase2Recipe, load_init, train_phase2
    from .spatial import DEFAULT_SMOOTHING

    work = Path(work)
    genes = read_genes(Path(data_dir) / "her2st" / "genes_785.txt")
    sections = her2st_sections(data_dir, with_images=True)
    train_names, val_names = split_sections([s.name for s in sections], [val_section])
    # a random-init backbone has nothing to keep frozen: train it in full (no LoRA)
    cfg = MMAPConfig(genes=genes, backbone="tiny", lora_last_blocks=0)
    spec = cfg.view_spec
    train = load_spot_set([s for s in sections if s.name in train_names], genes, spec)
    val = load_spot_set([s for s in sections if s.name in val_names], genes, spec)
    recipe1 = Phase1Recipe(epochs=epochs, batch_size=32, lr=1e-3, min_lr=1e-5, weight_decay=0.05,
                           mag_start_epoch=2, threads=threads, max_steps=max_steps)
    command = command_line("python", ["-m", "mmap_train.make_demo", *sys.argv[1:]])
    p1 = train_phase1(cfg, train, val, work / "phase1", recipe1,
                      extra={"command": command, "dataset": "her2st (Andersson et al. 2021)"})
    compute_features(p1["checkpoint"], sections, work / "features", overwrite=True)
    feats = read_cache(work / "features")
    targets = {s.name: load_targets(s, genes) for s in sections}
    # the demo's own recipe (a 6-section tiny model, best epoch on the validation section)
    recipe2 = Phase2Recipe(epochs=phase2_epochs, lr=1e-3, batch_size=64, keep="best", average_last=0, threads=threads)
    # the runtime's default neighbour smoothing goes into the bundle as it does for `mmap-train phase2`
    cfg2 = replace(load_init(p1["checkpoint"]).config, neighbour_smoothing=DEFAULT_SMOOTHING)
    p2 = train_phase2(cfg2, feats, targets, train_names, val_names, work / "phase2",
                      recipe2, init=load_init(p1["checkpoint"]), max_steps=max_steps,
                      extra={"command": command, "dataset": "her2st (Andersson et al. 2021)",
                             "phase1_history": p1["history"]})
    export_bundle(p2["checkpoint"], out, demo=True, overwrite=True)
    summary = {"phase1": p1["history"], "phase2": p2["history"], "phase2_best": {
        k: v for k, v in (p2["best"] or {}).items() if k != "per_section"}}
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def add_demo_familiarity(data_dir: str | Path, bundle_dir: str | Path, work: str | Path, *,
                         val_section: str = DEMO_VAL_SECTION) -> dict:
    """Add the training summary to an existing demo bundle: its training sections' spots (those with counts,
    as phase 2 trains on) through its fp32 encoder.onnx, summarised as `mmap-train phase2` does; only
    `familiarity.npz` and the manifest change."""
    from mmap_export.bundle_writer import add_familiarity

    from mmap_deploy.model.bundle import load_bundle
    from mmap_deploy.model.prototypes import PrototypeRule

    from .datasets import her2st_sections, load_targets, split_sections
    from .features import compute_features_from_bundle, read_cache
    from .phase2 import prepare, write_familiarity

    work = Path(work)
    bundle = load_bundle(bundle_dir)
    sections = her2st_sections(data_dir, with_images=True)
    train_names, _ = split_sections([s.name for s in sections], [val_section])
    train = [s for s in sections if s.name in train_names]
    compute_features_from_bundle(bundle_dir, train, work / "features_bundle", overwrite=True)
    feats = read_cache(work / "features_bundle")
    targets = {s.name: load_targets(s, bundle.manifest.genes) for s in train}
    record = write_familiarity(work, prepare(feats, targets, train_names, PrototypeRule()))
    add_familiarity(bundle.manifest, bundle.root, work / record["file"])
    bundle.manifest.provenance["familiarity"] = (
        f"training summary of {record['n_train_spots']} spots of {', '.join(train_names)} through this bundle's "
        "encoder.onnx (python -m mmap_train.make_demo --familiarity-only)")
    bundle.write_manifest()
    return record


@click.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="Folder holding her2st/.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--work", type=click.Path(file_okay=False), help="Keep checkpoints, cache and logs here (default: a temp dir).")
@click.option("--epochs", type=int, default=8, show_default=True, help="Phase-1 epochs.")
@click.option("--phase2-epochs", type=int, default=30, show_default=True, help="Phase-2 epochs.")
@click.option("--val-section", default=DEMO_VAL_SECTION, show_default=True,
              help="The section kept out of training, for validation.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads (1 is fastest on a busy machine).")
@click.option("--max-steps", type=int, default=0, help="Smoke runs: stop each phase after this many steps.")
@click.option("--familiarity-only", is_flag=True,
              help="Only add the training summary behind familiarity to the existing bundle at --out (no training; "
                   "its model files are left as they are).")
def main(data_dir, out, work, epochs, phase2_epochs, val_section, threads, max_steps, familiarity_only):
    """Train the tiny demo model on her2st and export it as the demo bundle."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tmp = None
    if work is None:
        tmp = tempfile.mkdtemp(prefix="mmap-demo-")
        work = tmp
    try:
        if familiarity_only:
            r = add_demo_familiarity(data_dir, out, work, val_section=val_section)
            click.echo(f"training summary added to {out}: {r['n_centroids']} centroids of {r['n_train_spots']} "
                       "training spots", err=True)
            return
        s = make_demo(data_dir, out, work, epochs=epochs, phase2_epochs=phase2_epochs, val_section=val_section,
                      threads=threads, max_steps=max_steps)
        click.echo(f"demo bundle written to {out}; phase-2 validation {json.dumps(s['phase2_best'])}", err=True)
    except UserError as e:
        click.echo(f"make_demo: error: {e}", err=True)
        sys.exit(2)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
