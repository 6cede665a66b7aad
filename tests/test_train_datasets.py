"""Targets, the join of counts and spots, the generic manifest layout, and the section split."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest

from mmap_deploy.errors import UserError
from mmap_deploy.model.preprocess import ViewSpec
from mmap_train.datasets import (
    Section, augment_views, her2st_sections, join_spots, load_targets, log_normalise, manifest_sections,
    read_counts, read_genes, resolve_section_mpp, split_sections,
)


def test_log_normalise_formula():
    counts = np.array([[1, 3, 0], [0, 0, 0], [5, 5, 10]], dtype=np.int64)
    t = log_normalise(counts)
    assert t.dtype == np.float32
    np.testing.assert_allclose(t[0], np.log10(1 + 1e4 * np.array([0.25, 0.75, 0.0])), rtol=1e-6)
    np.testing.assert_array_equal(t[1], 0.0)  # no counts: zeros, not NaN
    np.testing.assert_allclose((10.0 ** t[2] - 1).sum(), 1e4, rtol=1e-5)


def _write_counts(path, genes, rows):
    with gzip.open(path, "wt") as fh:
        fh.write("\t" + "\t".join(genes) + "\n")
        for spot, vals in rows:
            fh.write(spot + "\t" + "\t".join(str(v) for v in vals) + "\n")


def test_missing_gene_counts_as_zero_and_is_reported(tmp_path):
    p = tmp_path / "S1.tsv.gz"
    _write_counts(p, ["B", "A", "X"], [("1x2", [1, 2, 7]), ("3x4", [0, 4, 1])])
    table = read_counts(p)
    counts, missing = table.pick(["A", "B", "C"])
    assert table.spot_ids == ["1x2", "3x4"]
    np.testing.assert_array_equal(counts, [[2, 1, 0], [4, 0, 0]])  # X is not a target: ignored
    assert missing == ["C"]
    t = load_targets(Section("S1", counts=p), ["A", "B", "C"])
    assert t.missing_genes == ["C"]
    np.testing.assert_allclose(t.values[0], np.log10(1 + 1e4 * np.array([2 / 3, 1 / 3, 0])), rtol=1e-6)


def test_counts_are_read_by_one_reader():
    """Issue 22: read_counts_tsv, a wrapper only tests called, is gone; read_counts(path).pick(genes) it was."""
    import mmap_train.datasets as datasets

    assert not hasattr(datasets, "read_counts_tsv")


def test_bad_counts_and_genes_are_user_errors(tmp_path):
    p = tmp_path / "S1.tsv.gz"
    _write_counts(p, ["A"], [("1x2", [1]), ("1x2", [2])])
    with pytest.raises(UserError, match="1x2"):
        read_counts(p).pick(["A"])
    g = tmp_path / "genes.txt"
    g.write_text("A\nB\nA\n")
    with pytest.raises(UserError, match="line 3"):
        read_genes(g)
    with pytest.raises(UserError, match="not found"):
        read_counts(tmp_path / "none.tsv.gz")


def test_split_by_section():
    names = [f"S{i}" for i in range(10)]
    train, val = split_sections(names)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == names
    assert split_sections(names) == (train, val)  # seeded
    assert split_sections(names, ["S3"]) == ([n for n in names if n != "S3"], ["S3"])
    with pytest.raises(UserError, match="S99"):
        split_sections(names, ["S99"])
    assert split_sections(["only"]) == (["only"], [])


def test_her2st_join_of_counts_and_spots(real_data):
    genes = read_genes(real_data / "her2st" / "genes_785.txt")
    sec = her2st_sections(real_data, ["B4"])[0]
    assert sec.has_image and sec.mpp == pytest.approx(0.6876, abs=1e-4)
    targets = load_targets(sec, genes)
    table = join_spots(sec, targets)
    # the spot table, parsed here independently: id "{x}x{y}" -> (pixel_x, pixel_y)
    with open(sec.coords, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    pos = {f"{round(float(r['x']))}x{round(float(r['y']))}": (float(r["pixel_x"]), float(r["pixel_y"])) for r in rows}
    assert len(table.spot_ids) == len(targets.spot_ids) > 250
    for sid, xy in zip(table.spot_ids, table.xy):
        assert tuple(xy) == pytest.approx(pos[sid])
    # targets: the library of each spot over the 785 genes sums back to 1e4
    lib = (10.0 ** table.targets.astype(np.float64) - 1).sum(axis=1)
    np.testing.assert_allclose(lib[lib > 0], 1e4, rtol=1e-3)
    assert table.targets.shape == (len(table.spot_ids), 785)


def test_counts_row_without_position_is_a_user_error(real_data, tmp_path):
    genes = read_genes(real_data / "her2st" / "genes_785.txt")
    sec = her2st_sections(real_data, ["B4"])[0]
    lines = sec.coords.read_text().splitlines()
    short = tmp_path / "B4_selection.tsv"
    short.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # drop the first spot
    dropped = lines[1].split("\t")
    sec.coords = short
    with pytest.raises(UserError, match=f"'{dropped[0]}x{dropped[1]}'"):
        join_spots(sec, load_targets(sec, genes))


def test_manifest_layout(tmp_path):
    import anndata as ad

    from mmap_deploy.demo import sample_paths

    image, coords, mpp = sample_paths()
    adata = ad.AnnData(np.array([[1, 2], [3, 0]], dtype=np.float32))
    adata.obs_names = ["a", "b"]
    adata.var_names = ["G1", "G2"]
    adata.write_h5ad(tmp_path / "expr.h5ad")
    m = tmp_path / "sections.csv"
    m.write_text(f"slide,coords,expression,mpp\n{image},{coords},expr.h5ad,{mpp}\n")
    (sec,) = manifest_sections(m)
    assert (sec.name, sec.slide, sec.coords, sec.mpp) == ("B4_crop", image, coords, mpp)
    t = load_targets(sec, ["G2", "G1", "G3"])
    assert t.spot_ids == ["a", "b"] and t.missing_genes == ["G3"]
    np.testing.assert_allclose(t.values[1], np.log10(1 + 1e4 * np.array([0.0, 1.0, 0.0])), rtol=1e-6)
    m.write_text(f"slide,coords\n{image},{coords}\n")
    with pytest.raises(UserError, match="expression"):
        manifest_sections(m)
    m.write_text(f"slide,coords,expression\n{image},{coords},missing.h5ad\n")
    with pytest.raises(UserError, match="row 2"):
        manifest_sections(m)


def test_augment_views_keeps_shape_and_is_seeded():
    v = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    a = augment_views(v, np.random.default_rng(1))
    b = augment_views(v, np.random.default_rng(1))
    assert a.shape == v.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    # the dihedral part alone (no jitter) only permutes pixels
    c = augment_views(v, np.random.default_rng(2), jitter=0.0)
    np.testing.assert_array_equal(np.sort(c.reshape(3, -1), axis=1), np.sort(v.reshape(3, -1), axis=1))


def test_her2st_resolution_is_the_runtimes(real_data):
    """Training reads a her2st image at the resolution mmap-predict finds for it (one rule)."""
    sections = her2st_sections(real_data, ["A2", "B4", "C6", "H3"])
    for sec in sections:
        # the runtime's rule for a slide without its own resolution: the spot lattice's
        runtime = resolve_section_mpp(Section(sec.name, counts=sec.counts, slide=sec.slide, coords=sec.coords)) \
            if sec.has_image else None
        if runtime is not None:
            assert sec.mpp == runtime
    mpp = {s.name: s.mpp for s in sections}
    # A was imaged at another scale (~218 px per 200 µm step); B-H at ~290 px
    assert mpp["A2"] == pytest.approx(0.919, abs=0.002)
    assert all(m == pytest.approx(0.6875, abs=0.002) for n, m in mpp.items() if n != "A2")
    # the reference protocol's patch: 224 px at the images' true resolution, ~154 µm
    spec = ViewSpec()
    assert spec.patch_px == 224 and spec.patch_um == pytest.approx(154.0)
    assert 224 * min(mpp.values()) < spec.patch_um < 224 * max(m for n, m in mpp.items() if n != "A2")
