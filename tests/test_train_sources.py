"""Users' cohorts as training data: a HEST-1k folder and Space Ranger outs/ folders, end to end.

Both are built here from real her2st sections (B4 and C2, read at a quarter of
their resolution and written as pyramidal TIFFs, with their real counts):

- HEST-1k: ``wsis/{id}.tif``, ``st/{id}.h5ad`` (raw counts, pixel positions in
  obs, in_tissue), ``metadata/{id}.json`` (pixel size, technology, patient);
- Space Ranger: ``outs/spatial/`` with spots on a true Visium lattice, and
  ``outs/filtered_feature_bc_matrix.h5`` holding each in-tissue spot's counts
  (those of the nearest real her2st spot), as Space Ranger writes it.

Each drives `mmap-train phase1` (tiny backbone, a few steps), `features`,
`phase2` and `evaluate` from the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from conftest import write_pyramid


SHRINK = 4
HER2ST_MPP = 0.69  # her2st B-H images (spot-lattice fit; HEST-1k lists 0.689-0.698 for them)
MPP = HER2ST_MPP * SHRINK
N_GENES = 20


def _section(real_data: Path, name: str):
    """(quarter-resolution RGB, her2st spot ids, their xy in its pixels, counts table) of one her2st section."""
    import pandas as pd
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(real_data / "her2st" / "images" / f"{name}.jpg") as im:
        im.draft("RGB", (im.width // SHRINK, im.height // SHRINK))
        rgb = np.ascontiguousarray(np.asarray(im.convert("RGB")))
    spots = pd.read_csv(real_data / "her2st" / "spots" / f"{name}_selection.tsv", sep="\t")
    counts = pd.read_csv(real_data / "her2st" / "counts" / f"{name}.tsv.gz", sep="\t", index_col=0)
    ids = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    keep = [i for i, s in enumerate(ids) if s in counts.index]
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)[keep] / SHRINK
    return rgb, [ids[i] for i in keep], xy, counts


@pytest.fixture(scope="module")
def genes(real_data, tmp_path_factory) -> Path:
    from mmap_train.datasets import read_genes

    path = tmp_path_factory.mktemp("genes") / "genes.txt"
    path.write_text("\n".join(read_genes(real_data / "her2st" / "genes_785.txt")[:N_GENES]) + "\n")
    return path


@pytest.fixture(scope="module")
def hest_dir(real_data, tmp_path_factory) -> Path:
    """A HEST-1k download of two samples, her2st B4 and C2 (patients B and C)."""
    root = tmp_path_factory.mktemp("hest")
    for sub in ("wsis", "st", "metadata"):
        (root / sub).mkdir()
    for sid, name in (("SPA1", "B4"), ("SPA2", "C2")):
        rgb, ids, xy, counts = _section(real_data, name)
        write_pyramid(root / "wsis" / f"{sid}.tif", rgb, levels=(1, 2), resolution=1e4 / MPP)
        table = counts.loc[ids]
        a = ad.AnnData(table.to_numpy(np.float32))
        a.obs_names, a.var_names = ids, [str(g) for g in table.columns]
        a.obs["pxl_col_in_fullres"], a.obs["pxl_row_in_fullres"] = xy[:, 0], xy[:, 1]
        a.obs["in_tissue"] = np.where(np.arange(len(ids)) % 25 == 24, 0, 1)  # a few spots off tissue
        a.obsm["spatial"] = xy.copy()
        a.write_h5ad(root / "st" / f"{sid}.h5ad")
        (root / "metadata" / f"{sid}.json").write_text(json.dumps({
            "id": sid, "st_technology": "Spatial Transcriptomics", "pixel_size_um_estimated": MPP,
            "pixel_size_um_embedded": MPP, "patient": f"patient {name[0]}",
            "dataset_title": "HER2-positive breast tumors", "fullres_width": rgb.shape[1],
            "fullres_height": rgb.shape[0]}))
    return root


def _write_10x_h5(path: Path, barcodes: list[str], genes: list[str], counts: np.ndarray) -> None:
    """Space Ranger's feature-barcode matrix: features x barcodes, CSC, with features/ metadata.

    Adds what real files hold: a gene name that occurs twice (another Ensembl
    id) and an antibody feature, which the reader must sum and drop.
    """
    import h5py
    import scipy.sparse as sp

    names = [*genes, genes[0], "CD3_TotalSeqB"]
    extra = np.stack([np.arange(len(barcodes)) % 3, np.full(len(barcodes), 7)], axis=1)
    m = sp.csc_matrix(np.concatenate([counts, extra], axis=1).T.astype(np.int32))
    with h5py.File(path, "w") as h5:
        g = h5.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices.astype(np.int64), m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        f = g.create_group("features")
        f["name"] = np.array(names, dtype="S")
        f["id"] = np.array([f"ENSG{i:011d}" for i in range(len(names))], dtype="S")
        f["feature_type"] = np.array(["Gene Expression"] * (len(names) - 1) + ["Antibody Capture"], dtype="S")
        f["genome"] = np.array(["GRCh38"] * len(names), dtype="S")


@pytest.fixture(scope="module")
def spaceranger(real_data, tmp_path_factory):
    """Two Space Ranger outs/ folders (B4, C2) and a manifest listing them as slide,outs."""
    from test_layouts_geometry import spaceranger_outs

    root = tmp_path_factory.mktemp("spaceranger")
    rows = ["section,slide,outs,patient"]
    for name in ("B4", "C2"):
        rgb, ids, xy, counts = _section(real_data, name)
        slide = write_pyramid(root / f"{name}.tif", rgb, levels=(1, 2), resolution=1e4 / MPP)
        outs = spaceranger_outs(root / name, rgb, xy)
        pos = np.genfromtxt(outs / "spatial" / "tissue_positions.csv", delimiter=",", names=True, dtype=None,
                            encoding="utf-8")
        tissue = pos[pos["in_tissue"] == 1]
        sxy = np.stack([tissue["pxl_col_in_fullres"], tissue["pxl_row_in_fullres"]], axis=1)
        nearest = np.argmin(np.hypot(sxy[:, None, 0] - xy[None, :, 0], sxy[:, None, 1] - xy[None, :, 1]), axis=1)
        table = counts.loc[[ids[i] for i in nearest]]
        _write_10x_h5(outs / "filtered_feature_bc_matrix.h5", [str(b) for b in tissue["barcode"]],
                      [str(g) for g in table.columns], table.to_numpy())
        rows.append(f"{name},{slide.name},{name}/outs,{name[0]}")
    (root / "sections.csv").write_text("\n".join(rows) + "\n")
    return root


def _train_end_to_end(source: list[str], label_source: list[str], names: str, genes: list[str], tmp: Path) -> dict:
    from mmap_train.cli import main
    from mmap_train.features import read_cache

    p1 = tmp / "p1"
    main(["phase1", *source, *genes, "--val-sections", names.split(",")[1], "--backbone", "tiny",
          "--lora-blocks", "0", "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--lr", "1e-3",
          "--threads", "1", "--out", str(p1)])
    main(["features", *source, "--checkpoint", str(p1 / "checkpoint.pt"), "--out", str(tmp / "cache")])
    cache = read_cache(tmp / "cache")
    assert sorted(cache) == sorted(names.split(","))
    gene_file = ["--genes", str(p1 / "genes.txt")]
    main(["phase2", "--features", str(tmp / "cache"), *label_source, *gene_file, "--init", str(p1 / "checkpoint.pt"),
          "--epochs", "1", "--max-steps", "2", "--threads", "1", "--out", str(tmp / "p2")])
    main(["evaluate", "--checkpoint", str(tmp / "p2" / "checkpoint.pt"), "--features", str(tmp / "cache"),
          *label_source, *gene_file, "--json", str(tmp / "m.json")])
    m = json.loads((tmp / "m.json").read_text())
    assert m["n_spots"] == sum(len(c.spot_ids) for c in cache.values())
    assert sorted(m["per_section"]) == sorted(names.split(","))
    return {"metrics": m, "cache": cache, "p1": p1}


def test_hest_folder_trains_end_to_end(hest_dir, genes, real_data, tmp_path):
    src = ["--hest-dir", str(hest_dir), "--ids", "SPA1,SPA2"]
    res = _train_end_to_end(src, src, "SPA1,SPA2", ["--genes", str(genes)], tmp_path)
    cache, m = res["cache"], res["metrics"]
    # in-tissue spots only, positions and counts joined by barcode; the metadata's patients
    st = ad.read_h5ad(hest_dir / "st" / "SPA1.h5ad")
    assert cache["SPA1"].spot_ids == [s for s, t in zip(st.obs_names, st.obs["in_tissue"]) if t == 1]
    assert sorted(m["per_patient"]) == ["HER2-positive breast tumors: patient B", "HER2-positive breast tumors: patient C"]
    assert (res["p1"] / "genes.txt").read_text() == genes.read_text()
    from mmap_train.model import read_checkpoint

    ck = read_checkpoint(res["p1"] / "checkpoint.pt")
    assert ck["config"]["genes"] == genes.read_text().split()


def test_hest_top_genes_are_the_most_variable_and_written_with_the_checkpoint(hest_dir, tmp_path):
    from mmap_train.cli import main
    from mmap_train.datasets import log_normalise, read_counts
    from mmap_train.model import read_checkpoint

    main(["phase1", "--hest-dir", str(hest_dir), "--top-genes", "15", "--val-sections", "SPA2", "--backbone", "tiny",
          "--lora-blocks", "0", "--epochs", "1", "--max-steps", "1", "--batch-size", "4", "--threads", "1",
          "--out", str(tmp_path / "p1")])
    written = (tmp_path / "p1" / "genes.txt").read_text().split()
    assert written == read_checkpoint(tmp_path / "p1" / "checkpoint.pt")["config"]["genes"]
    # the training sample only (SPA2 validates), by a dense computation here
    t = read_counts(hest_dir / "st" / "SPA1.h5ad")
    dense = np.asarray(t.matrix.toarray() if hasattr(t.matrix, "toarray") else t.matrix, np.float64)
    var = log_normalise(dense).astype(np.float64).var(axis=0)
    order = sorted(range(len(t.genes)), key=lambda j: (-round(float(var[j]), 5), t.genes[j]))
    assert written[:5] == [t.genes[j] for j in order[:5]]
    assert len(written) == 15 and len(set(written)) == 15


def test_hest_mistakes_are_one_line(hest_dir, tmp_path, capsys):
    import shutil

    from mmap_train.cli import main

    bad = tmp_path / "hest"
    shutil.copytree(hest_dir, bad)
    meta = json.loads((bad / "metadata" / "SPA1.json").read_text())
    meta["pixel_size_um_estimated"] = MPP / 2
    (bad / "metadata" / "SPA1.json").write_text(json.dumps(meta))

    def error(*args) -> str:
        with pytest.raises(SystemExit) as e:
            main(["features", *args, "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "c")])
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    line = error("--hest-dir", str(bad), "--ids", "SPA1")
    assert "SPA1.json pixel_size_um_estimated gives 1.380" in line and "2.760" in line and "leave SPA1 out of --ids" in line
    line = error("--hest-dir", str(bad), "--ids", "SPA9")
    assert "SPA9.h5ad" in line and "available: SPA1, SPA2" in line
    (bad / "wsis" / "SPA2.tif").unlink()
    line = error("--hest-dir", str(bad), "--ids", "SPA2")
    assert "SPA2.tif: slide not found" in line
    line = error("--hest-dir", str(tmp_path))
    assert "no st/ folder" in line


def test_spaceranger_outs_train_end_to_end(spaceranger, genes, tmp_path):
    manifest = ["--manifest", str(spaceranger / "sections.csv")]
    res = _train_end_to_end(manifest, manifest, "B4,C2", ["--genes", str(genes)], tmp_path)
    m = res["metrics"]
    assert sorted(m["per_patient"]) == ["B", "C"]
    # every in-tissue barcode of the folder, and its resolution from the Visium lattice
    from mmap_train.datasets import manifest_sections, section_spots

    secs = {s.name: s for s in manifest_sections(spaceranger / "sections.csv")}
    assert res["cache"]["C2"].spot_ids == list(section_spots(secs["C2"]).ids)
    assert secs["C2"].mpp == pytest.approx(MPP, rel=0.01)


def test_spaceranger_counts_sum_a_repeated_gene_name_and_drop_other_features(tmp_path):
    from mmap_train.datasets import read_counts

    counts = np.array([[1, 0, 4], [0, 2, 0], [3, 3, 1]])
    _write_10x_h5(tmp_path / "m.h5", ["AAAC-1", "AAAG-1", "AAAT-1"], ["GA", "GB", "GC"], counts)
    t = read_counts(tmp_path / "m.h5")
    assert t.spot_ids == ["AAAC-1", "AAAG-1", "AAAT-1"] and t.genes == ["GA", "GB", "GC"]
    # GA appears twice (the second copy holds 0, 1, 2); CD3_TotalSeqB is an antibody, not a gene
    assert np.array_equal(t.matrix.toarray(), counts + np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]]))
    picked, missing = t.pick(["GC", "GA", "GZ"])
    assert np.array_equal(picked, [[4, 1, 0], [0, 1, 0], [1, 5, 0]]) and missing == ["GZ"]


def test_spaceranger_wrong_mpp_is_refused_with_both_values(spaceranger, tmp_path, capsys):
    from mmap_train.cli import main

    m = tmp_path / "sections.csv"
    m.write_text(f"section,slide,outs,mpp\nC2,{spaceranger / 'C2.tif'},{spaceranger / 'C2' / 'outs'},{MPP * 2}\n")
    with pytest.raises(SystemExit) as e:
        main(["features", "--manifest", str(m), "--checkpoint", "none.pt", "--out", str(tmp_path / "c")])
    assert e.value.code == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1
    assert "section C2:" in line and "5.520" in line and "2.760" in line and "mpp column" in line
    # no mpp column: the slide's own resolution against the Visium lattice of coordinates scaled by 0.6
    from test_layouts_geometry import spaceranger_outs

    rgb = np.zeros((600, 700, 3), np.uint8) + 200
    slide = write_pyramid(tmp_path / "s.tif", rgb, levels=(1,), resolution=1e4 / MPP)
    everywhere = np.stack(np.meshgrid(np.arange(0, 700, 20.0), np.arange(0, 600, 20.0)), axis=-1).reshape(-1, 2)
    outs = spaceranger_outs(tmp_path / "scaled", rgb, everywhere, scale=0.6)  # every spot in tissue
    (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"")
    m.write_text(f"section,slide,outs\nS,{slide},{outs}\n")
    with pytest.raises(SystemExit) as e:
        main(["features", "--manifest", str(m), "--checkpoint", "none.pt", "--out", str(tmp_path / "c")])
    line = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(line.splitlines()) == 1
    assert "section S:" in line and "the spot lattice gives 4.600 µm per pixel" in line and "0.60x the lattice's" in line
    assert "correct the manifest's mpp column or the coordinates" in line and "--skip-geometry-checks" not in line

