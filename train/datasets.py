"""Training data: sections (slide + spots + counts), expression targets, and spot patches.

Two layouts:

- her2st (`--data-dir`): `her2st/images/{section}.jpg`, `her2st/spots/{section}_selection.tsv`,
  `her2st/counts/{section}.tsv.gz` (spots x genes, raw counts), `her2st/genes_785.txt`.
- generic (`--manifest sections.csv`): one row per section with columns `slide`,
  `coords`, `expression` (an `.h5ad` of raw counts whose obs_names are the spot
  ids that the coords file gives) and optionally `section` and `mpp`. Relative
  paths are relative to the CSV file.

Targets: per spot, library-size normalise the counts over the target genes to
10 000, then log10(1 + x). A target gene absent from a section's table counts
as 0 in that section (and is reported). A spot with no counts on any target
gene gets all-zero targets.

Patches come from the runtime's own readers (`mmap_deploy.slide`,
`mmap_deploy.coords`) and preprocessing (`mmap_deploy.preprocess`); training
only adds random crop positions and augmentations.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmap_deploy.errors import UserError
from mmap_deploy.preprocess import DEFAULT_MPP, ViewSpec, make_views

log = logging.getLogger(__name__)

TARGET_SUM = 1e4


@dataclass
class Section:
    """One tissue section: where its slide, spot table and counts are."""

    name: str
    counts: Path
    slide: Path | None = None
    coords: Path | None = None
    mpp: float | None = None

    @property
    def has_image(self) -> bool:
        return self.slide is not None and self.slide.is_file()


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


def _counts_matrix(spot_ids: list[str], table_genes: list[str], matrix: np.ndarray, genes: list[str],
                   where: str) -> tuple[np.ndarray, list[str]]:
    """Pick `genes` (in that order) from a counts table; missing genes become 0 columns."""
    col = {g: i for i, g in enumerate(table_genes)}
    if len(col) != len(table_genes):
        dup = next(g for g in table_genes if table_genes.count(g) > 1)
        raise UserError(f"{where}: gene column '{dup}' appears twice; merge or remove the duplicate")
    if len(set(spot_ids)) != len(spot_ids):
        dup = next(s for s in spot_ids if spot_ids.count(s) > 1)
        raise UserError(f"{where}: spot '{dup}' has two rows; each spot must appear once")
    out = np.zeros((len(spot_ids), len(genes)), dtype=np.float64)
    missing = []
    for j, g in enumerate(genes):
        i = col.get(g)
        if i is None:
            missing.append(g)
        else:
            out[:, j] = matrix[:, i]
    if np.any(out < 0) or not np.all(np.isfinite(out)):
        raise UserError(f"{where}: counts must be finite and non-negative (raw counts, not log values)")
    return out, missing


def read_counts_tsv(path: str | Path, genes: list[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """A her2st counts table (spots x genes, tab-separated) -> (spot ids, counts (N, G), missing genes)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: counts table not found")
    try:
        # whole table at once: pandas' usecols with thousands of columns is far slower
        df = pd.read_csv(path, sep="\t", index_col=0)
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{path}: cannot read the counts table ({e}); expected spots as rows and genes as columns") from None
    ids = [str(s) for s in df.index]
    counts, missing = _counts_matrix(ids, [str(c) for c in df.columns], df.to_numpy(), genes, str(path))
    return ids, counts, missing


def read_counts_h5ad(path: str | Path, genes: list[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """An AnnData file of raw counts (obs = spots, var = genes) -> (spot ids, counts (N, G), missing genes)."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: expression file not found")
    adata = ad.read_h5ad(path)
    x = adata.X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    ids = [str(s) for s in adata.obs_names]
    counts, missing = _counts_matrix(ids, [str(g) for g in adata.var_names], x, genes, str(path))
    return ids, counts, missing


def load_targets(section: Section, genes: list[str]) -> Targets:
    """Read a section's counts and turn them into log-normalised targets."""
    reader = read_counts_h5ad if section.counts.suffix == ".h5ad" else read_counts_tsv
    ids, counts, missing = reader(section.counts, genes)
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
        s = Section(n, counts=root / "counts" / f"{n}.tsv.gz", slide=image if image.is_file() else None,
                    coords=root / "spots" / f"{n}_selection.tsv",
                    # the JPEGs carry no resolution; 200 µm spot pitch measured at 271-274 px
                    mpp=DEFAULT_MPP)
        if with_images and not s.has_image:
            continue
        out.append(s)
    if not out:
        raise UserError(f"{root}: no sections{' with images' if with_images else ''} found")
    return out


def manifest_sections(path: str | Path) -> list[Section]:
    """Sections listed in a CSV manifest with columns slide, coords, expression[, section, mpp]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; write a CSV with columns slide,coords,expression")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"slide", "coords", "expression"}
    if not rows:
        raise UserError(f"{path}: the manifest has no rows; add one row per section (slide,coords,expression)")
    lacking = need - set(rows[0])
    if lacking:
        raise UserError(f"{path}: missing column(s) {', '.join(sorted(lacking))}; "
                        "the header must name slide,coords,expression")
    out, names = [], set()
    for i, row in enumerate(rows, start=2):
        def resolve(key: str) -> Path:
            value = (row.get(key) or "").strip()
            if not value:
                raise UserError(f"{path}, row {i}: empty '{key}'")
            p = Path(value)
            p = p if p.is_absolute() else path.parent / p
            if not p.exists():
                raise UserError(f"{path}, row {i}: {key} file {p} does not exist")
            return p

        slide, coords, expr = resolve("slide"), resolve("coords"), resolve("expression")
        if expr.suffix != ".h5ad":
            raise UserError(f"{path}, row {i}: expression must be an .h5ad file of raw counts, got {expr.name}")
        name = (row.get("section") or "").strip() or slide.stem
        if name in names:
            raise UserError(f"{path}, row {i}: section name '{name}' is used twice; add a unique 'section' column")
        names.add(name)
        mpp = None
        if (row.get("mpp") or "").strip():
            try:
                mpp = float(row["mpp"])
            except ValueError:
                raise UserError(f"{path}, row {i}: mpp '{row['mpp']}' is not a number") from None
            if not mpp > 0:
                raise UserError(f"{path}, row {i}: mpp must be positive, got {mpp}")
        out.append(Section(name, counts=expr, slide=slide, coords=coords, mpp=mpp))
    return out


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
    from mmap_deploy.coords import read_coords

    if section.coords is None:
        raise UserError(f"section {section.name}: no spot coordinates file")
    spots = read_coords(section.coords)
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
    from mmap_deploy.bands import read_spot_views
    from mmap_deploy.slide import open_slide

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
