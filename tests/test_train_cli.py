"""`mmap-train phase1` and `features` from the command line, on the generic layout (CSV manifest + .h5ad counts)."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture()
def manifest(real_data, tmp_path):
    """The demo sample (a real B4 crop) with its real counts as an .h5ad, listed twice as two sections."""
    import anndata as ad
    from mmap_train.datasets import read_counts, read_genes

    from mmap_deploy.demo import sample_paths
    from mmap_deploy.inputs.coords import read_coords

    image, coords, mpp = sample_paths()
    genes = read_genes(real_data / "her2st" / "genes_785.txt")[:20]
    table = read_counts(real_data / "her2st" / "counts" / "B4.tsv.gz")
    ids, (counts, _) = table.spot_ids, table.pick(genes)
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
    from mmap_train.features import cache_backbone, read_cache
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
    # the cache names the backbone that made it, for phase 2
    assert json.loads((tmp_path / "cache" / "cache.json").read_text()) == {
        "backbone": "tiny", "embed_dim": 96, "checkpoint": "checkpoint.pt"}
    assert cache_backbone(tmp_path / "cache", 96) == "tiny"
    assert cache["crop1"].f.shape == (120, 96) and cache["crop1"].y1.shape == (120, 20)


def test_phase1_needs_a_data_source(capsys):
    from mmap_train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["phase1", "--out", "x", "--backbone", "tiny"])
    assert e.value.code == 2
    assert "--data-dir" in capsys.readouterr().err


def _one_line_exit(capsys, argv) -> str:
    from mmap_train.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_phase1_backbone_weights_not_found_is_one_line(manifest, tmp_path, capsys):
    """The first thing a user with UNI weights runs: a wrong path was a FileNotFoundError traceback,
    after every slide had been read; now one line, before any is."""
    err = _one_line_exit(capsys, [
        "phase1", "--manifest", str(manifest), "--genes", str(tmp_path / "genes.txt"), "--backbone", "tiny",
        "--out", str(tmp_path / "p1"), "--backbone-weights", "/path/that/does/not/exist"])
    assert err.startswith("error: /path/that/does/not/exist: backbone weights file not found;")  # as mmap-predict says it
    assert "--backbone-weights" in err and not (tmp_path / "p1").exists()


def test_phase1_unknown_device_is_one_line(manifest, tmp_path, capsys):
    err = _one_line_exit(capsys, [
        "phase1", "--manifest", str(manifest), "--genes", str(tmp_path / "genes.txt"), "--backbone", "tiny",
        "--out", str(tmp_path / "p1"), "--device", "gpu"])
    assert "device must be auto or a torch device: cpu, cuda, cuda:N" in err and "got 'gpu'" in err


def test_phase1_config_errors_are_user_errors(manifest, tmp_path, capsys):
    """MMAPConfig.validate raises UserError itself: the CLI no longer re-wraps ValueError."""
    err = _one_line_exit(capsys, [
        "phase1", "--manifest", str(manifest), "--genes", str(tmp_path / "genes.txt"), "--backbone", "tiny",
        "--out", str(tmp_path / "p1"), "--input-size", "100"])
    assert err == "error: input_size must be a multiple of the patch size 16, got 100"


def _settings():
    from mmap_train.backbones import get_backbone
    from mmap_train.config import MMAPConfig
    from mmap_train.phase1 import Phase1Recipe
    from mmap_train.phase2 import Phase2Recipe

    return [
        (lambda: get_backbone("vit_l"), "backbone must be one of tiny, small, uni; got 'vit_l'"),
        (lambda: MMAPConfig(genes=["A"], mag_loss="cos").validate(),
         "mag_loss must be one of cosine, contrastive; got 'cos'"),
        (lambda: MMAPConfig(genes=["A"], head_average="mean").validate(),
         "head_average must be one of reference, paper; got 'mean'"),
        (lambda: MMAPConfig(genes=["A"], backbone="vit").validate(),
         "backbone must be one of tiny, small, uni; got 'vit'"),
        (lambda: MMAPConfig(genes=["A"], lora_targets=r"attn\.(qkv").validate(),
         "lora_targets must be a regular expression"),
        (lambda: MMAPConfig.from_dict({"genes": ["A"], "colour": "red"}), "unknown config fields colour; known: "),
        (lambda: Phase1Recipe(device="gpu").validate(), "device must be auto or a torch device"),
        (lambda: Phase2Recipe(select="pcc_pooledd").validate(),
         "select must be one of pcc_pooled, pcc_per_slide; got 'pcc_pooledd'"),
        (lambda: Phase2Recipe(keep="first").validate(), "keep must be one of best, last; got 'first'"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_unknown_settings_are_one_line_user_errors_listing_the_known_values(case):
    """Every recipe or config field given as a string: an unknown value is a UserError (not ValueError,
    not a silent fallback) listing the known ones."""
    from mmap_deploy.errors import UserError

    make, message = _settings()[case]
    with pytest.raises(UserError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)
