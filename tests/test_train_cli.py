"""`mmap-train phase1` and `features` from the command line, on the generic layout (CSV manifest + .h5ad counts)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture()
def manifest(real_data, tmp_path):
    """The demo sample (a real B4 crop) with its real counts as an .h5ad, listed twice as two sections."""
    import anndata as ad
    from mmap_train.datasets import read_counts_tsv, read_genes

    from mmap_deploy.demo import sample_paths
    from mmap_deploy.inputs.coords import read_coords

    image, coords, mpp = sample_paths()
    genes = read_genes(real_data / "her2st" / "genes_785.txt")[:20]
    ids, counts, _ = read_counts_tsv(real_data / "her2st" / "counts" / "B4.tsv.gz", genes)
    crop_ids = set(read_coords(coords).ids)
    keep = [i for i, s in enumerate(ids) if s in crop_ids]
    adata = ad.AnnData(counts[keep].astype(np.float32))
    adata.obs_names = [ids[i] for i in keep]
    adata.var_names = genes
    adata.write_h5ad(tmp_path / "B4_crop.h5ad")
    (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
    m = tmp_path / "sections.csv"
    m.write_text("section,slide,coords,expression,mpp\n"
                 f"crop1,{image},{coords},B4_crop.h5ad,{mpp}\ncrop2,{image},{coords},B4_crop.h5ad,{mpp}\n")
    return m


def test_phase1_then_features_from_the_cli(manifest, tmp_path):
    from mmap_train.cli import main
    from mmap_train.features import read_cache
    from mmap_train.model import load_checkpoint

    out = tmp_path / "p1"
    main(["phase1", "--manifest", str(manifest), "--genes", str(tmp_path / "genes.txt"), "--val-sections", "crop2",
          "--backbone", "tiny", "--lora-blocks", "0", "--epochs", "1", "--max-steps", "2", "--batch-size", "8",
          "--lr", "1e-3", "--threads", "1", "--out", str(out)])
    model, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["phase"] == 1 and ckpt["training_data"]["val_sections"] == ["crop2"]
    assert model.config.genes[0] == (tmp_path / "genes.txt").read_text().split()[0]
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,") and len(log) == 2
    main(["features", "--manifest", str(manifest), "--sections", "crop1", "--checkpoint", str(out / "checkpoint.pt"),
          "--out", str(tmp_path / "cache")])
    cache = read_cache(tmp_path / "cache")
    assert list(cache) == ["crop1"]
    assert cache["crop1"].f.shape == (120, 96) and cache["crop1"].y1.shape == (120, 20)


def test_phase1_needs_a_data_source(capsys):
    from mmap_train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["phase1", "--out", "x", "--backbone", "tiny"])
    assert e.value.code == 2
    assert "--data-dir" in capsys.readouterr().err
