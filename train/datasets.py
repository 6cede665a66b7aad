"""Training data: sections (slide + spots + counts), expression targets, and spot patches.

Three layouts:

- her2st (`--data-dir`): `her2st/images/{section}.jpg`, `her2st/spots/{section}_selection.tsv`,
  `her2st/counts/{section}.tsv.gz` (spots x genes, raw counts), `her2st/genes_785.txt`.
- generic (`--manifest sections.csv`): one row per section with columns `slide`,
  `coords`, `expression` (an `.h5ad` of raw counts whose obs_names are the spot
  ids that the coords file gives) and optionally `section`, `mpp` and
  `patient`. `coords` may be anything `mmap-predict` takes as COORDS. A row may
  give a Space Ranger `outs/` folder instead of `coords` and `expression`
  (column `outs`, or `coords` naming the folder with `expression` empty):
  counts from `filtered_feature_bc_matrix.h5`, positions from `spatial/`.
  Relative paths are relative to the CSV file.
- HEST-1k (`--hest-dir DIR`): `wsis/{id}.tif`, `st/{id}.h5ad`,
  `metadata/{id}.json` (see `train.hest`).

her2st's JPEGs carry no resolution: a section's is its spot lattice's
(`lattice_mpp`, 0.686-0.689 µm/px for B1-H3), as `mmap-predict` finds it.
Spot positions and resolution of Space Ranger and HEST sections are checked
as at run time: the spot lattice's µm per pixel against the slide's (or the
metadata's), more than 10% apart is an error (`resolve_section_mpp`).

Targets: per spot, library-size normalise the counts over the target genes to
10 000, then log10(1 + x). A target gene absent from a section's table counts
as 0 in that section (and is reported). A spot with no counts on any target
gene gets all-zero targets.

Patches come from the runtime's own readers (`mmap_deploy.inputs.slide`,
`mmap_deploy.inputs.coords`) and preprocessing (`mmap_deploy.model.preprocess`); training
only adds random crop positions and augmentations.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmap_deploy.errors import UserError
from mmap_deploy.model.preprocess import ViewSpec, make_views

log = logging.getLogger(__name__)

TARGET_SUM = 1e4


@dataclass
class Section:
    """One tissue section: where its slide, spot positions and counts are.

    `coords` is what `mmap-predict` takes as COORDS (a table, or a Space
    Ranger / Visium HD folder), or, with `positions="h5ad"`, an AnnData file
    whose obs carry the pixel positions (HEST). `patient` groups sections for
    per-patient metrics and cross-validation (default: `patient_of(name)`).
    """

    name: str
    counts: Path
    slide: Path | None = None
    coords: Path | None = None
    mpp: float | None = None
    patient: str | None = None
    positions: str = "table"  # "table" (the runtime's COORDS reader) or "h5ad" (HEST's st/ files)

    @property
    def has_image(self) -> bool:
        return self.slide is not None and self.slide.is_file()


def section_spots(section: Section, all_spots: bool = False):
    """The section's spots (`mmap_deploy.inputs.coords.Spots`): in-tissue only unless `all_spots`."""
    if section.coords is None:
        raise UserError(f"section {section.name}: no spot coordinates file")
    if section.positions == "h5ad":
        from .hest_files import read_h5ad_positions

        return read_h5ad_positions(section.coords, all_spots=all_spots)
    from mmap_deploy.inputs.layouts import read_spot_input

    return read_spot_input(section.coords, all_spots=all_spots).spots


@dataclass
class Targets:
    """Log-normalised expression of one section's spots (rows in counts-table order)."""

    spot_ids: list[str]
    values: np.ndarray  # (N, G) float32
    missing_genes: list[str] = field(default_factory=list)

    def rows_for(self, spot_ids: list[str], where: str) -> np.ndarray:
        """Target rows for `spot_ids` (in that order); UserError naming the first unknown spot."""
        index = {s: i for i, s in enumerate(self.spot_ids)}
        rows = np.empty(len(spot_ids), dtype=np.int64)
        for j, s in enumerate(spot_ids):
            i = index.get(s)
            if i is None:
                raise UserError(f"{where}: spot '{s}' has no row in the expression table; "
                                "the spot ids of features/coords and counts must match")
            rows[j] = i
        return rows


# -- genes and targets -------------------------------------------------------
def read_genes(path: str | Path) -> list[str]:
    """Target gene names, one a line (blank lines ignored); UserError on duplicates."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: gene list not found; pass --genes FILE with one gene name a line")
    genes = [g.strip() for g in path.read_text().splitlines() if g.strip()]
    if not genes:
        raise UserError(f"{path}: the gene list is empty; write one gene name a line")
    seen: set[str] = set()
    for i, g in enumerate(genes):
        if g in seen:
            raise UserError(f"{path}: gene '{g}' is listed twice (line {i + 1}); remove the duplicate")
        seen.add(g)
    return genes


def log_normalise(counts: np.ndarray) -> np.ndarray:
    """log10(1 + 1e4 * counts / library size), the library size summed over the given genes.

    Spots with a library size of 0 get 0 everywhere (not NaN).
    """
    counts = np.asarray(counts, dtype=np.float64)
    lib = counts.sum(axis=1, keepdims=True)
    scaled = np.divide(counts * TARGET_SUM, lib, out=np.zeros_like(counts), where=lib > 0)
    return np.log10(1.0 + scaled).astype(np.float32)


@dataclass
class CountsTable:
    """A raw counts table as read: spots x all its genes (numpy or scipy sparse)."""

    spot_ids: list[str]
    genes: list[str]
    matrix: Any
    path: Path

    def pick(self, genes: list[str]) -> tuple[np.ndarray, list[str]]:
        """(N, len(genes)) float64 counts of `genes` in that order (absent genes are 0 columns), and the absent."""
        where = str(self.path)
        col: dict[str, int] = {}
        for i, g in enumerate(self.genes):
            if g in col:
                raise UserError(f"{where}: gene column '{g}' appears twice; merge or remove the duplicate")
            col[g] = i
        seen: set[str] = set()
        for s in self.spot_ids:
            if s in seen:
                raise UserError(f"{where}: spot '{s}' has two rows; each spot must appear once")
            seen.add(s)
        present = [(j, col[g]) for j, g in enumerate(genes) if g in col]
        missing = [g for g in genes if g not in col]
        out = np.zeros((len(self.spot_ids), len(genes)), dtype=np.float64)
        if present:
            dst, src = (np.asarray(v, dtype=np.int64) for v in zip(*present))
            block = self.matrix[:, src]
            out[:, dst] = block.toarray() if hasattr(block, "toarray") else np.asarray(block, dtype=np.float64)
        if np.any(out < 0) or not np.all(np.isfinite(out)):
            raise UserError(f"{where}: counts must be finite and non-negative (raw counts, not log values)")
        return out, missing


def _tsv_table(path: Path) -> CountsTable:
    import pandas as pd

    try:
        # whole table at once: pandas' usecols with thousands of columns is far slower
        df = pd.read_csv(path, sep="\t", index_col=0)
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{path}: cannot read the counts table ({e}); expected spots as rows and genes as columns") from None
    return CountsTable([str(s) for s in df.index], [str(c) for c in df.columns], df.to_numpy(), path)


def _h5ad_table(path: Path) -> CountsTable:
    """An AnnData file of raw counts; with an obs `in_tissue` column, only the in-tissue spots (as at run time)."""
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: cannot read this AnnData file ({e}); re-copy it") from None
    x = adata.X
    if x is None:
        raise UserError(f"{path}: the AnnData file has no X matrix of counts")
    ids = [str(s) for s in adata.obs_names]
    if "in_tissue" in adata.obs:
        keep = np.asarray(adata.obs["in_tissue"]).astype(float) == 1
        x = x[np.flatnonzero(keep)]
        ids = [i for i, k in zip(ids, keep) if k]
    return CountsTable(ids, [str(g) for g in adata.var_names], x, path)


def _tenx_h5_table(path: Path) -> CountsTable:
    """Space Ranger's `filtered_feature_bc_matrix.h5`: barcodes x "Gene Expression" features, by gene name.

    Space Ranger stores features x barcodes (CSC); a few gene names occur
    twice (different Ensembl ids): their counts are summed under the name.
    """
    import h5py
    import scipy.sparse as sp

    try:
        with h5py.File(path, "r") as h5:
            g = h5["matrix"]
            shape = tuple(int(v) for v in g["shape"][()])
            m = sp.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=shape)
            barcodes = [b.decode() for b in g["barcodes"][()]]
            names = [n.decode() for n in g["features/name"][()]]
            types = ([t.decode() for t in g["features/feature_type"][()]]
                     if "feature_type" in g["features"] else ["Gene Expression"] * len(names))
    except (OSError, KeyError) as e:
        raise UserError(f"{path}: not a Space Ranger feature-barcode matrix ({e}); "
                        "pass the outs/ folder that holds filtered_feature_bc_matrix.h5") from None
    rows = [i for i, t in enumerate(types) if t == "Gene Expression"]
    genes = list(dict.fromkeys(names[i] for i in rows))
    index = {n: j for j, n in enumerate(genes)}
    merge = sp.csr_matrix((np.ones(len(rows)), (np.arange(len(rows)), [index[names[i]] for i in rows])),
                          shape=(len(rows), len(genes)))
    counts = (m[rows].T.tocsr() @ merge).tocsc()  # barcodes x unique gene names
    return CountsTable(barcodes, genes, counts, path)


def read_counts(path: str | Path) -> CountsTable:
    """A counts table by its suffix: `.h5ad` (AnnData), `.h5` (Space Ranger), else a tab-separated table."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: counts table not found")
    if path.suffix == ".h5ad":
        return _h5ad_table(path)
    if path.suffix == ".h5":
        return _tenx_h5_table(path)
    return _tsv_table(path)


def load_targets(section: Section, genes: list[str]) -> Targets:
    """Read a section's counts and turn them into log-normalised targets."""
    table = read_counts(section.counts)
    counts, missing = table.pick(genes)
    ids = table.spot_ids
    if missing:
        log.info("%s: %d of %d target genes are absent from the counts table; counted as 0",
                 section.counts, len(missing), len(genes))
    return Targets(ids, log_normalise(counts), missing)


# -- layouts -----------------------------------------------------------------
def her2st_sections(data_dir: str | Path, names: list[str] | None = None,
                    with_images: bool = False) -> list[Section]:
    """The her2st sections under `data_dir/her2st` (all, or `names`), sorted by name.

    `with_images=True` keeps only the sections whose full-resolution image is present.
    """
    root = Path(data_dir) / "her2st"
    if not (root / "counts").is_dir():
        raise UserError(f"{root}: no her2st/counts folder here; pass --data-dir pointing at the folder that holds her2st/")
    found = sorted(p.name[: -len(".tsv.gz")] for p in (root / "counts").glob("*.tsv.gz"))
    if names:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise UserError(f"{root / 'counts'}: no counts for section(s) {', '.join(unknown)}; "
                            f"available: {', '.join(found)}")
        found = [n for n in found if n in set(names)]
    out = []
    for n in found:
        image = root / "images" / f"{n}.jpg"
        coords = root / "spots" / f"{n}_selection.tsv"
        # The JPEGs carry no resolution, so the section's is its spot lattice's, by the rule
        # mmap-predict applies to the same image: one resolution at training and at run time.
        s = Section(n, counts=root / "counts" / f"{n}.tsv.gz", slide=image if image.is_file() else None,
                    coords=coords, mpp=lattice_mpp(coords))
        if with_images and not s.has_image:
            continue
        out.append(s)
    if not out:
        raise UserError(f"{root}: no sections{' with images' if with_images else ''} found")
    return out


SPACERANGER_COUNTS = "filtered_feature_bc_matrix.h5"


def manifest_sections(path: str | Path) -> list[Section]:
    """Sections listed in a CSV manifest: slide, and coords + expression or a Space Ranger outs folder.

    Optional columns: section (default: the slide's stem), mpp, patient.
    Space Ranger rows get their resolution checked against the spot lattice
    (`resolve_section_mpp`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; write a CSV with columns slide,coords,expression "
                        "(or slide,outs for Space Ranger folders)")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise UserError(f"{path}: the manifest has no rows; add one row per section (slide,coords,expression)")
    header = set(rows[0])
    if "slide" not in header or not ({"coords", "expression"} <= header or {"outs", "coords"} & header):
        lacking = sorted({"slide", "coords", "expression"} - header)
        raise UserError(f"{path}: missing column(s) {', '.join(lacking)}; the header must name "
                        "slide,coords,expression (or slide,outs with Space Ranger outs/ folders)")
    out, names = [], set()
    for i, row in enumerate(rows, start=2):
        def value(key: str) -> str:
            return (row.get(key) or "").strip()

        def resolve(key: str) -> Path:
            if not value(key):
                raise UserError(f"{path}, row {i}: empty '{key}'")
            p = Path(value(key))
            p = p if p.is_absolute() else path.parent / p
            if not p.exists():
                raise UserError(f"{path}, row {i}: {key} file {p} does not exist")
            return p

        slide = resolve("slide")
        outs_key = "outs" if value("outs") else ("coords" if not value("expression") else None)
        if outs_key:
            coords = resolve(outs_key)
            expr = next((c for c in (coords / SPACERANGER_COUNTS, coords.parent / SPACERANGER_COUNTS)
                         if coords.is_dir() and c.is_file()), None)
            if expr is None:
                raise UserError(f"{path}, row {i}: {coords} has no {SPACERANGER_COUNTS}; pass Space Ranger's "
                                "outs/ folder, or give the counts in an 'expression' column")
        else:
            coords, expr = resolve("coords"), resolve("expression")
            if expr.suffix not in (".h5ad", ".h5"):
                raise UserError(f"{path}, row {i}: expression must be an .h5ad file of raw counts "
                                f"(or Space Ranger's .h5), got {expr.name}")
        name = value("section") or slide.stem
        if name in names:
            raise UserError(f"{path}, row {i}: section name '{name}' is used twice; add a unique 'section' column")
        names.add(name)
        mpp = None
        if value("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                raise UserError(f"{path}, row {i}: mpp '{row['mpp']}' is not a number") from None
            if not mpp > 0:
                raise UserError(f"{path}, row {i}: mpp must be positive, got {mpp}")
        sec = Section(name, counts=expr, slide=slide, coords=coords, mpp=mpp, patient=value("patient") or None)
        if outs_key:
            sec.mpp = resolve_section_mpp(sec, mpp_source=f"{path} row {i} mpp column" if mpp else None)
        out.append(sec)
    return out


def lattice_mpp(coords: Path, positions: str = "table") -> float | None:
    """µm per pixel of a spot table's lattice (`geometry.fit_lattice`), None where it has none.

    What `mmap-predict` uses for a slide that carries no resolution of its own.
    `positions` as `Section.positions` ("h5ad": HEST's st/ AnnData).
    """
    from mmap_deploy.inputs.geometry import fit_lattice

    if positions == "h5ad":
        from .hest_files import h5ad_lattice

        spots, spec = h5ad_lattice(coords)
    else:
        from mmap_deploy.inputs.layouts import read_spot_input

        si = read_spot_input(coords)
        spots, spec = si.spots, si.lattice
    fit = fit_lattice(spots.xy, spots.array_xy, spec)
    return None if fit is None else float(fit.mpp)


def resolve_section_mpp(section: Section, *, mpp_source: str | None = None,
                        fix: str = "correct the manifest's mpp column or the coordinates") -> float:
    """The section's µm per pixel, checked as `mmap-predict` checks it, for sections read from folders.

    The slide's own resolution (or `section.mpp`, named by `mpp_source`), else
    the spot lattice's; when the spots lie on a known lattice and the two
    differ by more than `geometry.MPP_TOLERANCE`, a UserError names both.
    """
    from mmap_deploy.inputs.geometry import MPP_TOLERANCE, fallback_mpp, fit_lattice, resolution_problem
    from mmap_deploy.inputs.layouts import read_spot_input
    from mmap_deploy.inputs.slide import open_slide

    if section.positions == "h5ad":
        from .hest_files import h5ad_lattice

        spots, spec = h5ad_lattice(section.coords)
        hd_mpp = None
    else:
        si = read_spot_input(section.coords)
        spots, spec, hd_mpp = si.spots, si.lattice, si.hd_mpp
    fit = fit_lattice(spots.xy, spots.array_xy, spec)
    with open_slide(section.slide, mpp=section.mpp, fallback_mpp=fallback_mpp(fit, hd_mpp)) as slide:
        mpp, source = slide.mpp, (mpp_source if slide.mpp_source == "--mpp" and mpp_source else slide.mpp_source)
        own = slide.metadata_mpp
    if section.mpp is not None and own is not None and abs(own[0] / mpp - 1.0) > MPP_TOLERANCE:
        raise UserError(f"section {section.name}: {source} gives {mpp:.3f} µm per pixel but the slide "
                        f"{section.slide} says {own[0]:.3f} ({own[1]}); one of them is wrong: {fix}")
    if fit is not None:
        problem = resolution_problem(fit, mpp, source, section.coords, fix=fix)
        if problem:
            raise UserError(f"section {section.name}: {problem}")
    return float(mpp)


def top_variable_genes(sections: list[Section], n: int) -> list[str]:
    """The `n` genes of highest variance of log10(1 + counts per 10 000), pooled over the sections' spots.

    Library sizes are over all of a spot's genes; candidates are the genes
    every section's table has (so no target is 0 by absence). Ties go to the
    name that sorts first. The usual "highly variable genes" idea, kept to
    one pass over sparse counts without scanpy.
    """
    import scipy.sparse as sp

    if n < 1:
        raise UserError(f"--top-genes must be at least 1, got {n}")
    common: set[str] | None = None
    total, total_sq, spots = {}, {}, 0
    for sec in sections:
        table = read_counts(sec.counts)
        x = sp.csr_matrix(table.matrix, dtype=np.float64)
        lib = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
        y = sp.diags(scale) @ x
        y.data = np.log10(1.0 + y.data)
        s1 = np.asarray(y.sum(axis=0)).ravel()
        s2 = np.asarray(y.multiply(y).sum(axis=0)).ravel()
        for j, g in enumerate(table.genes):
            total[g] = total.get(g, 0.0) + s1[j]
            total_sq[g] = total_sq.get(g, 0.0) + s2[j]
        common = set(table.genes) if common is None else common & set(table.genes)
        spots += x.shape[0]
    if not common or spots < 2:
        raise UserError("no gene is in every training section's counts table; pass --genes FILE instead")
    var = {g: total_sq[g] / spots - (total[g] / spots) ** 2 for g in common}
    ranked = sorted(common, key=lambda g: (-var[g], g))
    if len(ranked) < n:
        raise UserError(f"--top-genes {n}: only {len(ranked)} genes are in every training section's table")
    return ranked[:n]


def patient_of(section: str) -> str:
    """The patient of a section: its name's leading letters (her2st: B1..B6 are patient B).

    A name that does not start with a letter is its own patient.
    """
    m = re.match(r"[A-Za-z]+", section)
    return m.group(0) if m else section


def split_sections(names: list[str], val: list[str] | None = None, *, fraction: float = 0.2,
                   seed: int = 42) -> tuple[list[str], list[str]]:
    """Split section names into (train, validation), by section.

    `val` given: exactly those (UserError for unknown names). Otherwise a seeded
    draw of max(1, round(fraction * n)) sections; one section alone trains and
    validates on nothing held out (validation empty).
    """
    names = sorted(names)
    if val:
        unknown = [v for v in val if v not in names]
        if unknown:
            raise UserError(f"validation section(s) {', '.join(unknown)} are not among the sections "
                            f"({', '.join(names)})")
        held = sorted(set(val))
    elif len(names) < 2:
        held = []
    else:
        rng = np.random.default_rng(seed)
        n_val = max(1, int(round(fraction * len(names))))
        held = sorted(rng.permutation(names)[:n_val].tolist())
    train = [n for n in names if n not in set(held)]
    if not train:
        raise UserError("every section is held out for validation; leave at least one for training")
    return train, held


# -- spots with patches ------------------------------------------------------
@dataclass
class SpotTable:
    """The spots of one section that have both a position and targets."""

    section: str
    spot_ids: list[str]
    xy: np.ndarray  # (N, 2) float64, full-resolution pixels
    targets: np.ndarray  # (N, G) float32


def join_spots(section: Section, targets: Targets) -> SpotTable:
    """Join a section's spot positions (runtime coords reader) with its counts rows.

    Every counts row must have a position (UserError naming the first that
    does not); positions without counts are dropped.
    """
    spots = section_spots(section)
    pos = {s: i for i, s in enumerate(spots.ids)}
    rows = []
    for s in targets.spot_ids:
        i = pos.get(s)
        if i is None:
            raise UserError(f"{section.counts}: spot '{s}' has counts but no position in {section.coords}; "
                            "check that both files describe the same section")
        rows.append(i)
    rows_arr = np.asarray(rows, dtype=np.int64)
    return SpotTable(section.name, list(targets.spot_ids), np.asarray(spots.xy, np.float64)[rows_arr],
                     targets.values)


def read_section_patches(section: Section, xy: np.ndarray, spec: ViewSpec, workers: int = 1) -> np.ndarray:
    """(N, patch_px, patch_px, 3) uint8 patches of the spots at `xy`, via the runtime's band reader.

    Training crops the views at random positions, so only the patch itself
    comes from the band reader (each slide tile decoded once); a spot whose
    region cannot be decoded is an error here.
    """
    from mmap_deploy.inputs.bands import read_spot_views
    from mmap_deploy.inputs.slide import open_slide

    if section.slide is None:
        raise UserError(f"section {section.name}: no slide image; phase 1 needs the H&E image")
    reader = open_slide(section.slide, mpp=section.mpp)
    try:
        p = spec.patch_px
        out = np.empty((len(xy), p, p, 3), dtype=np.uint8)
        for chunk in read_spot_views(reader, xy, spec, workers=workers, patches=True):
            if chunk.failed:
                raise chunk.failed[0][1]
            out[chunk.rows] = chunk.views
    finally:
        reader.close()
    return out


# -- augmentation (training only) -------------------------------------------
def augment_views(views: np.ndarray, rng: np.random.Generator, jitter: float = 0.1) -> np.ndarray:
    """The method's augmentations on one spot's (V, S, S, 3) uint8 views.

    A random dihedral transform (flips, rot90, transpose) shared by all views,
    and brightness/contrast jitter of +-`jitter`. (The reference also uses an
    elastic transform; it is left out here.)
    """
    k = int(rng.integers(4))
    out = np.rot90(views, k=k, axes=(1, 2))
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    if jitter > 0:
        bright = 1.0 + rng.uniform(-jitter, jitter)
        contrast = 1.0 + rng.uniform(-jitter, jitter)
        x = out.astype(np.float32)
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * contrast + mean * bright
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def training_views(patch: np.ndarray, spec: ViewSpec, rng: np.random.Generator, augment: bool = True) -> np.ndarray:
    """One spot's training views: random sub-crop positions, then the augmentations."""
    views = make_views(patch, spec, spec.random_offsets(rng))
    return augment_views(views, rng) if augment else views
