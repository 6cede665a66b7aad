"""`mmap-train`: phase 1, the feature cache, phase 2 and evaluation from the command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import numpy as np

from mmap_deploy.atomic import atomic_path
from mmap_deploy.errors import UserError
from mmap_deploy.messages import command_line, run_cli

from . import missing_train_extra
from .backbones import BACKBONES
from .datasets import (
    Section,
    her2st_sections,
    manifest_sections,
    read_genes,
    split_sections,
)
from .spatial import DEFAULT_SMOOTHING

log = logging.getLogger("mmap_train")


def _csv_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _sections(data_dir: str | None, manifest: str | None, names: list[str] | None,
              with_images: bool, hest_dir: str | None = None) -> list[Section]:
    if sum(bool(v) for v in (data_dir, manifest, hest_dir)) != 1:
        raise UserError("pass exactly one of --data-dir (her2st layout), --manifest (CSV of slide,coords,expression "
                        "or slide,outs) or --hest-dir (a HEST-1k download)")
    if data_dir:
        return her2st_sections(data_dir, names, with_images=with_images)
    if hest_dir:
        from .hest import hest_sections

        return hest_sections(hest_dir, names, with_images=with_images)
    secs = manifest_sections(manifest)
    if names:
        unknown = [n for n in names if n not in {s.name for s in secs}]
        if unknown:
            raise UserError(f"{manifest}: no section(s) {', '.join(unknown)}")
        secs = [s for s in secs if s.name in set(names)]
    return secs


def _names(sections: str | None, ids: str | None) -> list[str] | None:
    if sections and ids:
        raise UserError("pass --sections or --ids, not both (--ids names HEST samples, --sections the others)")
    return _csv_list(sections or ids)


def _genes(genes: str | None, data_dir: str | None, top_genes: int | None = None,
           sections: list[Section] | None = None) -> list[str]:
    if genes and top_genes is not None:
        raise UserError("pass --genes FILE or --top-genes N, not both")
    if genes:
        return read_genes(genes)
    if top_genes is not None:
        from .datasets import top_variable_genes

        return top_variable_genes(sections or [], top_genes)
    if data_dir:
        return read_genes(Path(data_dir) / "her2st" / "genes_785.txt")
    raise UserError("pass --genes FILE (one target gene a line) or --top-genes N")


def sections_from_dirs(names: list[str], counts_dir: str | Path, spots_dir: str | Path | None) -> list[Section]:
    """Sections named by a feature cache, with counts `{s}.tsv.gz`/`{s}.h5ad` and spots `{s}_selection.tsv`."""
    counts_dir = Path(counts_dir)
    out = []
    for n in names:
        counts = next((p for p in (counts_dir / f"{n}.tsv.gz", counts_dir / f"{n}.tsv", counts_dir / f"{n}.h5ad")
                       if p.is_file()), None)
        if counts is None:
            raise UserError(f"{counts_dir}: no counts for section {n} ({n}.tsv.gz or {n}.h5ad); "
                            "pass --counts pointing at the folder of count tables")
        coords = Path(spots_dir) / f"{n}_selection.tsv" if spots_dir else None
        out.append(Section(n, counts=counts, coords=coords if coords and coords.is_file() else None))
    return out


def _check_spots(sections: list[Section], feats: dict) -> None:
    """Every cached spot must be in its section's spot table, when that table is there."""
    from .datasets import section_spots

    for sec in sections:
        if sec.coords is None:
            log.info("%s: no spot table; spot ids are checked against the counts only", sec.name)
            continue
        ids = set(section_spots(sec, all_spots=True).ids)
        bad = [s for s in feats[sec.name].spot_ids if s not in ids]
        if bad:
            raise UserError(f"{sec.coords}: spot '{bad[0]}' of the feature cache is not in this spot table "
                            f"({len(bad)} such spots); the cache and the spots folder describe different sections")


def _label_sources(counts, spots, manifest, hest_dir, cached: list[str]) -> list[Section]:
    """The cached sections' counts and positions: --counts/--spots folders, a --manifest or a --hest-dir."""
    if sum(bool(v) for v in (counts, manifest, hest_dir)) != 1:
        raise UserError("pass exactly one of --counts (with --spots), --manifest or --hest-dir for the sections' counts")
    if counts:
        return sections_from_dirs(cached, counts, spots)
    return _sections(None, manifest, cached, with_images=False, hest_dir=hest_dir)


def _load_cache_and_targets(features: str, genes_file: str, names: list[str] | None, *, counts=None, spots=None,
                            manifest=None, hest_dir=None):
    """(genes, cached features, targets, the patients the data names) for phase 2, evaluate and cv.

    Sections without a given patient are grouped by their name (`cv.patient_folds`).
    """
    from .datasets import load_targets
    from .features import read_cache

    genes = read_genes(genes_file)
    feats = read_cache(features, names)
    secs = _label_sources(counts, spots, manifest, hest_dir, list(feats))
    _check_spots(secs, feats)
    targets = {s.name: load_targets(s, genes) for s in secs}
    return genes, feats, targets, {s.name: s.patient for s in secs if s.patient}


def _section_positions(counts, spots, manifest, hest_dir, cached: list[str]):
    """Section -> its spots in µm (`spatial.section_positions`); None (said why) when a section has no spot table."""
    from .spatial import section_positions

    secs = _label_sources(counts, spots, manifest, hest_dir, cached)
    bare = [s.name for s in secs if s.coords is None]
    if bare:
        click.echo(f"no spot table for section(s) {', '.join(bare)} (pass --spots): models are scored without "
                   "neighbour smoothing", err=True)
        return None
    positions = {s.name: section_positions(s) for s in secs}
    unknown = [name for name, pos in positions.items() if pos is None]
    if unknown:
        click.echo(f"no µm per pixel for section(s) {', '.join(unknown)} (no slide, mpp or spot lattice): models "
                   "are scored without neighbour smoothing", err=True)
        return None
    return positions


def _finite_or_null(value):
    """NaN (a section whose genes are all constant) as JSON null: strict JSON readers reject NaN."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


class _Group(click.Group):
    """A click group that keeps the arguments it was given: the run's command line, for the provenance."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["mmap_argv"] = list(args)  # `meta` is shared with the subcommand's context
        return super().parse_args(ctx, args)


def _command_line() -> str:
    """`mmap-train ARGS` as given (also when `main(argv)` is called in-process), shell-quoted."""
    ctx = click.get_current_context(silent=True)
    return command_line("mmap-train", ctx.meta.get("mmap_argv") if ctx is not None else None)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log more detail to stderr.")
def cli(verbose: bool) -> None:
    """Train MMAP: phase 1 on slides, the feature cache, phase 2 on cached features, evaluation."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


data_options = [
    click.option("--data-dir", type=click.Path(file_okay=False), help="Folder holding her2st/ (images, spots, counts)."),
    click.option("--manifest", type=click.Path(dir_okay=False),
                 help="CSV with columns slide,coords,expression[,section,mpp,patient], or slide,outs "
                      "(Space Ranger outs/ folders)."),
    click.option("--hest-dir", type=click.Path(file_okay=False),
                 help="A HEST-1k download (wsis/, st/, metadata/), in place of --data-dir or --manifest."),
    click.option("--sections", help="Comma-separated sections to use (default: all with images)."),
    click.option("--ids", help="Comma-separated HEST sample IDs to use (default: every sample in --hest-dir)."),
]

label_options = [
    click.option("--counts", type=click.Path(file_okay=False), help="Folder of {section}.tsv.gz / .h5ad counts."),
    click.option("--spots", type=click.Path(file_okay=False), help="Folder of {section}_selection.tsv spot tables (with --counts)."),
    click.option("--manifest", type=click.Path(dir_okay=False),
                 help="The training manifest (slide,coords,expression or slide,outs), in place of --counts."),
    click.option("--hest-dir", type=click.Path(file_okay=False), help="A HEST-1k download, in place of --counts."),
    click.option("--ids", help="Comma-separated HEST sample IDs of the cache to use (default: all)."),
]


def _add(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


@cli.command()
@_add(data_options)
@click.option("--val-sections", help="Comma-separated validation sections (default: 20% of the sections, seeded).")
@click.option("--genes", type=click.Path(dir_okay=False), help="Target genes, one a line (her2st default: genes_785.txt).")
@click.option("--top-genes", type=int, default=None,
              help="Instead of --genes: the N most variable genes of the training sections (written to OUT/genes.txt).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (checkpoints, log, genes.txt).")
@click.option("--backbone", type=click.Choice(list(BACKBONES)), default="uni", show_default=True,
              help="; ".join(f"{b.name}: {b.about}" for b in BACKBONES.values()) + ".")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), help="Local UNI weights file (never downloaded).")
@click.option("--lora-blocks", type=int, default=9, show_default=True, help="LoRA on the last N blocks; 0 trains the whole backbone.")
@click.option("--input-size", type=int, default=112, show_default=True,
              help="Side in pixels of each view fed to the ViT (a multiple of its patch size, 16).")
@click.option("--epochs", type=int, default=50, show_default=True, help="Training epochs (the cosine schedule's length).")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Spots per micro-batch (per process under torchrun).")
@click.option("--accumulate", type=int, default=1, show_default=True, help="Micro-batches per optimiser step.")
@click.option("--lr", type=float, default=1e-5, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--min-lr", type=float, default=1e-6, show_default=True, help="Learning rate at the end of the cosine schedule.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay.")
@click.option("--mag-start-epoch", type=int, default=5, show_default=True,
              help="Epoch from which the magnification-alignment loss joins the MSE.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the initialisation, order and crops.")
@click.option("--max-steps", type=int, default=0, help="Stop after this many optimiser steps (smoke runs).")
@click.option("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice).")
@click.option("--device", default="auto", show_default=True, help="torch device, e.g. cuda:1; auto: cuda when available.")
@click.option("--no-amp", is_flag=True, help="No bfloat16 autocast on GPU.")
@click.option("--loader-threads", type=int, default=1, show_default=True, help="Threads making the next batches' views.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
def phase1(data_dir, manifest, hest_dir, sections, ids, val_sections, genes, top_genes, out, backbone,
           backbone_weights, lora_blocks, input_size, epochs, batch_size, accumulate, lr, min_lr, weight_decay,
           mag_start_epoch, seed, max_steps, threads, device, no_amp, loader_threads, resume):
    """Train the multi-magnification encoder (phase 1) on slides and their counts.

    Data-parallel on N GPUs: torchrun --nproc_per_node N -m mmap_train.cli phase1 ... (rank 0 writes OUT).
    """
    from .backbones import check_weights_file, get_backbone
    from .config import MMAPConfig
    from .phase1 import Phase1Recipe, load_spot_set, train_phase1

    if backbone_weights:  # before the slides are read: a wrong path should not cost the reading time
        check_weights_file(backbone_weights)
    recipe = Phase1Recipe(epochs=epochs, batch_size=batch_size, accumulate=accumulate, lr=lr, min_lr=min_lr,
                          weight_decay=weight_decay, mag_start_epoch=mag_start_epoch, seed=seed,
                          max_steps=max_steps, threads=threads, device=device, amp=not no_amp,
                          loader_threads=loader_threads)
    recipe.validate()
    secs = _sections(data_dir, manifest, _names(sections, ids), with_images=True, hest_dir=hest_dir)
    train_names, val_names = split_sections([s.name for s in secs], _csv_list(val_sections))
    gene_list = _genes(genes, data_dir, top_genes, [s for s in secs if s.name in train_names])
    _write_genes(Path(out) / "genes.txt", gene_list)
    cfg = MMAPConfig(genes=gene_list, backbone=backbone, backbone_weights=backbone_weights or "",
                     lora_last_blocks=lora_blocks, view_spec=get_backbone(backbone).view_spec(input_size=input_size))
    cfg.validate()
    spec = cfg.view_spec
    train = load_spot_set([s for s in secs if s.name in train_names], gene_list, spec)
    val = load_spot_set([s for s in secs if s.name in val_names], gene_list, spec) if val_names else None
    res = train_phase1(cfg, train, val, out, recipe, resume=resume, extra={"command": _command_line()})
    click.echo(f"phase 1: {len(res['history'])} epochs logged; checkpoint {res['checkpoint']}", err=True)


def _write_genes(path: Path, genes: list[str]) -> None:
    """The run's target genes, one a line: the --genes FILE of the later steps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(genes) + "\n")


@cli.command()
@_add(data_options)
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Phase-1 (or later) checkpoint.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache folder ({section}_f.npy, _y1.npy, _spots.txt).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Spots per encoder call.")
@click.option("--overwrite", is_flag=True, help="Recompute sections already in the cache.")
def features(data_dir, manifest, hest_dir, sections, ids, checkpoint, out, batch_size, overwrite):
    """Compute f and y1 of every spot of every slide with a phase-1 checkpoint."""
    from .features import compute_features

    secs = _sections(data_dir, manifest, _names(sections, ids), with_images=True, hest_dir=hest_dir)
    written = compute_features(checkpoint, secs, out, batch_size=batch_size, overwrite=overwrite)
    click.echo(f"feature cache {out}: wrote {len(written)} section(s)", err=True)


@cli.command()
@click.option("--features", "features_dir", required=True, type=click.Path(file_okay=False), help="Feature cache folder.")
@_add(label_options)
@click.option("--genes", required=True, type=click.Path(dir_okay=False), help="Target genes, one a line (the order of y1's columns).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Writes OUT/checkpoint.pt and OUT/log.json.")
@click.option("--sections", help="Comma-separated sections of the cache to use (default: all).")
@click.option("--val-sections", help="Comma-separated validation sections (default: none with --keep last; "
              "20% of the sections, seeded, with --keep best).")
@click.option("--init", "init_ckpt", type=click.Path(dir_okay=False), help="Phase-1 checkpoint the cache was made with: kept as the encoder.")
@click.option("--head-average", type=click.Choice(["reference", "paper"]), default="paper", show_default=True,
              help="Final prediction: reference (y1 + MLP3(h))/2, or paper Eq. 9 (MLP1(e2) + MLP2(f) + MLP3(h))/3.")
@click.option("--l-fixed", type=int, default=32, show_default=True, help="Fixed bank length L (0: adaptive, floor(0.5 K)).")
@click.option("--epochs", type=int, default=None, help="Training epochs (default: the recipe's, 10).")
@click.option("--lr", type=float, default=None, help="Peak learning rate, AdamW (default: the recipe's, 1e-4).")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the recipe's, 1e-4).")
@click.option("--batch-size", type=int, default=None, help="Spots per step (default: the recipe's, 64).")
@click.option("--keep", type=click.Choice(["best", "last"]), default=None,
              help="Kept head: best on the validation sections, or the end of training (default: the recipe's, last).")
@click.option("--average-last", type=int, default=None,
              help="With --keep last: average the head's weights over the last N epochs (default: the recipe's, 5).")
@click.option("--dropout", type=float, default=None, help="Dropout of the head's attention (default: 0.2).")
@click.option("--smooth-radius-um", type=float, default=DEFAULT_SMOOTHING.radius_um, show_default=True,
              help="Predictions are smoothed over each spot's neighbours within this radius, in µm (at run time, "
                   "written into the bundle; 250 µm: the 4 nearest ST spots).")
@click.option("--smooth-weight", type=float, default=DEFAULT_SMOOTHING.weight, show_default=True,
              help="The neighbours' mean's weight against the spot's own prediction's 1 (0: no smoothing).")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the head's initialisation and order.")
@click.option("--max-steps", type=int, default=0, help="Stop after this many optimiser steps (smoke runs).")
@click.option("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice).")
def phase2(features_dir, counts, spots, manifest, hest_dir, ids, genes, out, sections, val_sections, init_ckpt,
           head_average, l_fixed, epochs, lr, weight_decay, batch_size, keep, average_last, dropout, smooth_radius_um,
           smooth_weight, seed, max_steps, threads):
    """Train the prototype-aware fusion head (phase 2) on a feature cache."""
    from mmap_deploy.model.neighbours import NeighbourSmoothing
    from mmap_deploy.model.prototypes import PrototypeRule

    from .features import cache_backbone
    from .phase2 import Phase2Recipe, config_for_cache, load_init, train_phase2

    smoothing = NeighbourSmoothing(smooth_radius_um, smooth_weight)
    smoothing.validate()

    gene_list, feats, targets, patients = _load_cache_and_targets(features_dir, genes, _names(sections, ids),
                                                                  counts=counts, spots=spots, manifest=manifest,
                                                                  hest_dir=hest_dir)
    recipe = Phase2Recipe(seed=seed, threads=threads)
    for k, v in (("epochs", epochs), ("lr", lr), ("weight_decay", weight_decay), ("batch_size", batch_size),
                 ("keep", keep), ("average_last", average_last)):
        if v is not None:
            setattr(recipe, k, v)
    if keep == "best" and average_last is None:
        recipe.average_last = 0
    recipe.validate()
    if recipe.keep == "last" and not val_sections:
        # validation would only be logged: every section trains
        train_names, val_names = sorted(feats), []
    else:
        train_names, val_names = split_sections(list(feats), _csv_list(val_sections))
    init = load_init(init_ckpt) if init_ckpt else None
    # the cache's backbone and --genes, not the checkpoint's: train_phase2 checks that they agree with --init
    backbone = cache_backbone(features_dir, next(iter(feats.values())).f.shape[1],
                              fallback=init.config.backbone if init else None)
    cfg = config_for_cache(gene_list, backbone, base=init.config if init else None,
                           head_average=head_average, prototype_rule=PrototypeRule(l_fixed=l_fixed),
                           neighbour_smoothing=smoothing if smoothing.active else None,
                           **({"dropout": dropout} if dropout is not None else {}))
    res = train_phase2(cfg, feats, targets, train_names, val_names, out, recipe, init=init, max_steps=max_steps,
                       extra={"command": _command_line(), "features": str(features_dir)}, patients=patients)
    best = res["best"] or {}
    fam = res["meta"]["familiarity"]
    click.echo(f"familiarity summary: {Path(out) / fam['file']} ({fam['n_centroids']} centroids of "
               f"{fam['n_train_spots']} training spots; mmap-export puts it into the bundle)", err=True)
    click.echo(f"phase 2: checkpoint {res['checkpoint']} (validation pcc_pooled "
               f"{best.get('pcc_pooled', float('nan')):.4f}, pcc_per_slide {best.get('pcc_per_slide', float('nan')):.4f})",
               err=True)


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Phase-2 checkpoint to evaluate.")
@click.option("--features", "features_dir", required=True, type=click.Path(file_okay=False), help="Feature cache folder.")
@_add(label_options)
@click.option("--genes", required=True, type=click.Path(dir_okay=False), help="Target genes, one a line (the checkpoint's).")
@click.option("--json", "json_out", required=True, type=click.Path(dir_okay=False), help="Where to write the metrics.")
@click.option("--sections", help="Comma-separated sections of the cache to evaluate (default: all).")
@click.option("--no-smoothing", is_flag=True,
              help="Score the fusion head's predictions without the checkpoint's neighbour smoothing.")
def evaluate(checkpoint, features_dir, counts, spots, manifest, hest_dir, ids, genes, json_out, sections, no_smoothing):
    """Predict every cached section (k-means per section, as at run time) and write the metrics as JSON.

    With the checkpoint's neighbour smoothing (as the bundle exported from it runs) when the sections'
    spot positions are given (--spots, a manifest or --hest-dir), over each section's cached spots.
    """
    from .phase2 import evaluate_checkpoint, load_fusion

    gene_list, feats, targets, patients = _load_cache_and_targets(
        features_dir, genes, _names(sections, ids), counts=counts, spots=spots, manifest=manifest, hest_dir=hest_dir)
    positions = None
    if not no_smoothing and load_fusion(checkpoint)[0].neighbour_smoothing is not None:
        positions = _section_positions(counts, spots, manifest, hest_dir, list(feats))
    train_target, defined_on = _subset_basis(checkpoint, features_dir, genes, feats, targets, counts=counts,
                                             spots=spots, manifest=manifest, hest_dir=hest_dir)
    from .metrics import gene_subsets

    m = evaluate_checkpoint(checkpoint, feats, targets, patients=patients, positions=positions,
                            smoothing=not no_smoothing, subsets=gene_subsets(train_target))
    m["gene_subsets_defined_on"] = defined_on
    m["checkpoint"] = str(checkpoint)
    m["sections"] = sorted(m["per_section"])
    with atomic_path(Path(json_out)) as tmp:
        tmp.write_text(json.dumps(_finite_or_null(m), indent=1) + "\n")
    click.echo(metrics_table(m), err=True)
    click.echo(f"pcc_pooled {m['pcc_pooled']:.4f}  pcc_per_slide {m['pcc_per_slide']:.4f}  mse {m['mse']:.4f}  "
               f"mae {m['mae']:.4f}  n_spots {m['n_spots']}  ({m['n_constant_genes_pooled']} constant genes pooled)",
               err=True)
    for who, scores in (("model", m), ("y1", m.get("y1", {}))):
        if "subsets" in scores:
            click.echo(f"{who}: " + "  ".join(f"{name} pooled {v['pcc_pooled']:.4f} per slide {v['pcc_per_slide']:.4f}"
                                              for name, v in scores["subsets"].items()), err=True)


def _subset_basis(checkpoint, features_dir, genes, feats, targets, **sources) -> tuple[np.ndarray, str]:
    """The targets the gene subsets are defined on: the checkpoint's training sections' cached spots when the
    cache and the counts have them, else the evaluated spots (said in the JSON)."""
    from .phase2 import load_fusion

    train = load_fusion(checkpoint)[2].get("training_data", {}).get("train_sections") or []
    try:
        if not train:
            raise UserError("the checkpoint names no training sections")
        _, tf, tt, _ = _load_cache_and_targets(features_dir, genes, list(train), **sources)
        rows = [tt[n].values[tt[n].rows_for(tf[n].spot_ids, n)] for n in train if len(tf[n].spot_ids)]
        return np.concatenate(rows), f"training sections of the checkpoint ({', '.join(train)}), cached spots"
    except UserError as e:
        log.info("gene subsets on the evaluated spots: %s", e)
        rows = [targets[n].values[targets[n].rows_for(feats[n].spot_ids, n)] for n in feats if len(feats[n].spot_ids)]
        return np.concatenate(rows), "the evaluated sections' spots (the checkpoint's training sections are not " \
                                     "in the cache or the counts)"


def metrics_table(m: dict) -> str:
    """Per-section and per-patient rows of `evaluate`'s metrics, as a fixed-width text table."""
    rows = [("section", name, v["n_spots"], v["pcc"], float("nan"), v["mse"], v["mae"])
            for name, v in m["per_section"].items()]
    rows += [("patient", name, v["n_spots"], v["pcc_pooled"], v["pcc_per_slide"], v["mse"], v["mae"])
             for name, v in m.get("per_patient", {}).items()]
    lines = [f"{'':8} {'name':8} {'spots':>6} {'pcc':>8} {'per-slide':>9} {'mse':>7} {'mae':>7}"]
    for kind, name, n, pcc, slide, mse, mae in rows:
        slide_s = "" if kind == "section" else f"{slide:.4f}"
        lines.append(f"{kind:8} {name:8} {n:6d} {pcc:8.4f} {slide_s:>9} {mse:7.4f} {mae:7.4f}")
    return "\n".join(lines)


@cli.command()
@click.option("--features", "features_dir", required=True, type=click.Path(file_okay=False), help="Feature cache folder.")
@_add(label_options)
@click.option("--genes", required=True, type=click.Path(dir_okay=False), help="Target genes, one a line (the order of y1's columns).")
@click.option("--json", "json_out", required=True, type=click.Path(dir_okay=False),
              help="Where to write per-fold and mean ± sd metrics (rewritten after each fold).")
@click.option("--sections", help="Comma-separated sections of the cache to use (default: all).")
@click.option("--candidates", help="Comma-separated phase-2 recipes to compare (default: all of mmap_train.cv.CANDIDATES).")
@click.option("--epochs", type=int, default=None, help="Override every candidate's epochs (smoke runs).")
@click.option("--max-steps", type=int, default=0, help="Stop each training after this many steps (smoke runs).")
@click.option("--patients", help="Comma-separated patients (held-out folds) to run (default: every patient).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Folds run at once, in worker processes.")
@click.option("--threads", type=int, default=1, show_default=True, help="CPU threads for torch (per process).")
def cv(features_dir, counts, spots, manifest, hest_dir, ids, genes, json_out, sections, candidates, epochs, max_steps, patients, jobs, threads):
    """Leave-one-patient-out comparison of phase-2 recipes with y1 and a ridge probe on f."""
    import torch

    from .cv import CANDIDATES, cross_validate, familiarity_table, subset_table, table
    from .features import cache_backbone

    names = _csv_list(candidates) or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise UserError(f"--candidates: unknown recipe(s) {', '.join(unknown)}; known: {', '.join(CANDIDATES)}")
    if threads > 0:
        torch.set_num_threads(threads)
    gene_list, feats, targets, patient_map = _load_cache_and_targets(
        features_dir, genes, _names(sections, ids), counts=counts, spots=spots, manifest=manifest, hest_dir=hest_dir)
    positions = _section_positions(counts, spots, manifest, hest_dir, list(feats))
    out = Path(json_out)

    import os
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    machine = {"cpu": cpu, "cores": os.cpu_count(), "load_average_start": list(os.getloadavg())}

    def write(res):
        tmp = out.with_name(out.name + ".tmp")
        info = {**machine, "load_average_now": list(os.getloadavg())}
        tmp.write_text(json.dumps(_finite_or_null({**res, "machine": info, "command": _command_line()}),
                                  indent=1) + "\n")
        tmp.replace(out)

    backbone = cache_backbone(features_dir, next(iter(feats.values())).f.shape[1])
    res = cross_validate(gene_list, feats, targets, {n: CANDIDATES[n] for n in names}, backbone=backbone,
                         epochs=epochs, max_steps=max_steps, patients=_csv_list(patients), jobs=jobs, on_fold=write,
                         patient_of=patient_map, positions=positions)
    write(res)
    click.echo(table(res), err=True)
    for extra in (subset_table(res), familiarity_table(res)):
        if extra:
            click.echo("\n" + extra, err=True)
    c = res["choice"]
    click.echo(f"chosen: {c['candidate']} ({'beats' if c['meets_rule'] else 'does NOT beat'} ridge per slide in "
               f"{res['summary'][c['candidate']]['wins_per_slide_vs_ridge']} of {c['n_folds']} folds; "
               f"needed {c['min_wins_per_slide_vs_ridge']})", err=True)
    if "smoothing_all_patients" in res:
        a = res["smoothing_all_patients"]
        click.echo(f"neighbour smoothing chosen with every patient training: radius {a['radius_um']:g} µm, "
                   f"weight {a['weight']:g} (ridge alpha {a['ridge_alpha']:g})", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a UserError prints one line `error: ...` (as mmap-predict and mmap-export do)
    and exits 2; anything else keeps its traceback."""
    try:
        run_cli(lambda: cli.main(args=argv, prog_name="mmap-train", standalone_mode=False),
                missing_extra=missing_train_extra)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
