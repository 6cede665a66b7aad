"""Phase 2 on a feature cache: banks are the runtime's, padding is masked, loss goes down, checkpoints load."""

from __future__ import annotations

import json
import shlex
import warnings

import numpy as np
import pytest
import torch
from mmap_train.datasets import Targets
from mmap_train.features import SectionFeatures
from mmap_train.model import load_checkpoint
from mmap_train.phase2 import (
    BankedSpots,
    Phase2Recipe,
    config_for_cache,
    load_fusion,
    predict,
    predict_section,
    prepare,
    train_phase2,
)

from mmap_deploy.errors import UserError
from mmap_deploy.model.prototypes import PrototypeRule, slide_prototypes

GENES = [f"G{i}" for i in range(12)]
DIM = 96  # the tiny backbone's width


@pytest.fixture(scope="module")
def cache():
    """Three sections of clustered 96-d features whose targets depend on the cluster and on f."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(DIM, len(GENES))).astype(np.float32) / 10
    feats, targets = {}, {}
    for s, n in (("S1", 60), ("S2", 45), ("S3", 12)):
        centres = rng.normal(size=(4, DIM)).astype(np.float32)
        f = centres[rng.integers(0, 4, n)] + 0.3 * rng.normal(size=(n, DIM)).astype(np.float32)
        ids = [f"{i}x{s}" for i in range(n)]
        y1 = (f @ w + 0.5 * rng.normal(size=(n, len(GENES)))).astype(np.float32)
        t = (f @ w + 1.0).astype(np.float32)
        feats[s] = SectionFeatures(s, ids, f, y1)
        targets[s] = Targets(ids[::-1], t[::-1].copy())  # counts in another order: joined by id
    return feats, targets


@pytest.fixture()
def tiny_twin(monkeypatch):
    """A second backbone as wide as `tiny` (96): the width alone no longer tells them apart."""
    from dataclasses import replace

    from mmap_train.backbones import BACKBONES

    monkeypatch.setitem(BACKBONES, "tiny_twin", replace(BACKBONES["tiny"], name="tiny_twin"))
    return "tiny_twin"


def _write_cache(cache, folder):
    from mmap_train.features import write_section

    feats, _ = cache
    for sf in feats.values():
        write_section(folder, sf)
    return folder


def test_a_cache_names_its_backbone_and_phase2_builds_on_that_one(cache, tmp_path, tiny_twin):
    from mmap_train.features import cache_backbone, write_cache_info

    folder = _write_cache(cache, tmp_path / "cache")
    write_cache_info(folder, tiny_twin, DIM, tmp_path / "p1" / "checkpoint.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: nothing is guessed, nothing said
        assert cache_backbone(folder, DIM) == tiny_twin
    assert config_for_cache(GENES, cache_backbone(folder, DIM)).backbone == tiny_twin
    with pytest.raises(UserError, match=r"holds features of the tiny_twin backbone.*another --out"):
        write_cache_info(folder, "small", 384, "other.pt")
    write_cache_info(tmp_path / "small", "small", 384, "small.pt")
    with pytest.raises(UserError, match=r"names the small backbone \(384 wide\) but the cached features are 96"):
        cache_backbone(tmp_path / "small", DIM)


def test_an_older_cache_without_the_name_is_read_by_its_width_with_a_warning(cache, tmp_path, monkeypatch):
    from mmap_train.features import cache_backbone

    from mmap_deploy.errors import MMAPWarning

    folder = _write_cache(cache, tmp_path / "old")
    with pytest.warns(MMAPWarning, match=r"does not name its backbone.*taken as tiny, the backbone of 96-wide"):
        assert cache_backbone(folder, DIM) == "tiny"
    assert cache_backbone(folder, DIM, fallback="tiny") == "tiny"  # --init names it: no guess
    with pytest.raises(UserError, match=r"cached features are 100-wide; known backbones give 96 \(tiny\)"):
        cache_backbone(folder, 100)


def test_an_older_cache_is_refused_once_two_backbones_share_its_width(cache, tmp_path, tiny_twin):
    from mmap_train.features import cache_backbone

    folder = _write_cache(cache, tmp_path / "old")
    with pytest.raises(UserError, match=r"does not name its backbone and 96-wide features fit tiny and tiny_twin; "
                                        r"rebuild it with `mmap-train features`"):
        cache_backbone(folder, DIM)
    assert cache_backbone(folder, DIM, fallback=tiny_twin) == tiny_twin


def test_banks_are_the_runtime_banks_and_padding_is_masked(cache):
    feats, targets = cache
    cfg = config_for_cache(GENES, "tiny")
    rule = cfg.prototype_rule
    secs = prepare(feats, targets, ["S1", "S3"], rule)
    for p in secs:
        bank, mask = slide_prototypes(feats[p.name].f, rule).banks(feats[p.name].f)
        np.testing.assert_array_equal(p.centroids[p.bank_idx], bank)
        assert p.k == min(max(len(p.f) // 5, 32), 80, len(p.f))
    torch.manual_seed(0)
    from mmap_train.model import FusionHead

    head = FusionHead(cfg, DIM).eval()
    padded = predict(head, BankedSpots(secs, rule.max_bank))  # training path: banks padded to 40
    unpadded = np.concatenate([predict_section(cfg, head, feats[p.name]) for p in secs])  # run-time path
    np.testing.assert_allclose(padded, unpadded, rtol=1e-5, atol=1e-5)


def test_targets_joined_by_spot_id(cache):
    feats, targets = cache
    (p,) = prepare(feats, targets, ["S2"], config_for_cache(GENES, "tiny").prototype_rule)
    rows = targets["S2"].rows_for(feats["S2"].spot_ids, "S2")
    np.testing.assert_array_equal(p.target, targets["S2"].values[rows])
    np.testing.assert_array_equal(p.target[0], targets["S2"].values[-1])


def test_loss_goes_down_and_checkpoint_loads(cache, tmp_path):
    feats, targets = cache
    cfg = config_for_cache(GENES, "tiny")
    recipe = Phase2Recipe(epochs=8, batch_size=32, lr=3e-3, threads=1, keep="best", average_last=0)
    res = train_phase2(cfg, feats, targets, ["S1", "S2"], ["S3"], tmp_path, recipe, progress=False)
    losses = [r["train_loss"] for r in res["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert json.loads((tmp_path / "log.json").read_text())[0]["epoch"] == 1
    kept = [r for r in res["history"] if r.get("kept")]
    assert res["meta"]["epoch"] == kept[-1]["epoch"]
    assert res["meta"]["metrics"]["pcc_pooled"] == pytest.approx(max(r["val_pcc_pooled"] for r in res["history"]))
    # fusion-only checkpoint: load_checkpoint rebuilds the model and says its encoder is untrained
    with pytest.warns(UserWarning, match="no trained encoder"):
        model, ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["encoder_trained"] is False and ckpt["phase"] == 2
    _, fusion, _ = load_fusion(tmp_path / "checkpoint.pt")
    for k, v in fusion.state_dict().items():
        assert torch.equal(model.fusion.state_dict()[k], v)


def test_select_picks_by_its_metric_and_a_typo_is_a_user_error(cache, tmp_path):
    """Phase2Recipe.select: a typo used to fall back to pcc_pooled silently; now it stops before training."""
    from mmap_deploy.errors import UserError

    feats, targets = cache
    cfg = config_for_cache(GENES, "tiny")
    recipe = dict(epochs=4, batch_size=32, lr=3e-3, threads=1, keep="best", average_last=0)
    with pytest.raises(UserError, match=r"select must be one of pcc_pooled, pcc_per_slide; got 'pcc_per_slid'"):
        train_phase2(cfg, feats, targets, ["S1"], ["S2", "S3"], tmp_path / "typo",
                     Phase2Recipe(select="pcc_per_slid", **recipe), progress=False)
    assert not (tmp_path / "typo" / "checkpoint.pt").exists()
    res = train_phase2(cfg, feats, targets, ["S1"], ["S2", "S3"], tmp_path / "ok",
                       Phase2Recipe(select="pcc_per_slide", **recipe), progress=False)
    best = max(r["val_pcc_per_slide"] for r in res["history"])
    assert res["meta"]["metrics"]["pcc_per_slide"] == pytest.approx(best)


def test_paper_averaging_and_fixed_l(cache, tmp_path):
    feats, targets = cache
    cfg = config_for_cache(GENES, "tiny", head_average="paper", prototype_rule=PrototypeRule(l_fixed=3))
    res = train_phase2(cfg, feats, targets, ["S1", "S2"], [], tmp_path, Phase2Recipe(epochs=1, threads=1),
                       progress=False)
    c, _, _ = load_fusion(res["checkpoint"])
    assert (c.head_average, c.prototype_rule.l_fixed) == ("paper", 3)
    assert res["meta"]["training_data"]["val_sections"] == []


def test_on_top_of_phase1_keeps_the_encoder(cache, tmp_path):
    from conftest import make_tiny_model

    feats, targets = cache
    init = make_tiny_model()
    init.config.genes = list(GENES)
    enc = {k: v.clone() for k, v in init.encoder.state_dict().items()}
    res = train_phase2(init.config, feats, targets, ["S1"], ["S2"], tmp_path, Phase2Recipe(epochs=1, threads=1),
                       init=init, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full checkpoint loads without the untrained-encoder warning
        model, ckpt = load_checkpoint(res["checkpoint"])
    assert ckpt["encoder_trained"] is True
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in enc.items())


def test_cli_phase2_and_evaluate_on_published_features(real_data, tmp_path, capsys):
    from mmap_train.cli import main

    her2st = real_data / "her2st"
    common = ["--features", str(real_data / "mmap_features" / "train"), "--counts", str(her2st / "counts"),
              "--spots", str(her2st / "spots"), "--genes", str(her2st / "genes_785.txt")]
    from mmap_deploy.errors import MMAPWarning

    # the published features name no backbone: read as UNI's, by their width (1024), saying so
    with pytest.warns(MMAPWarning, match=r"does not name its backbone.*taken as uni"):
        main(["phase2", *common, "--out", str(tmp_path / "p2"), "--sections", "A2,A3,A4",
              "--val-sections", "A4", "--epochs", "1", "--max-steps", "2", "--threads", "1"])
    assert (tmp_path / "p2" / "checkpoint.pt").is_file()
    # keeping the end of training: no section is held out unless asked; the kept head averages 2 epochs
    last = ["phase2", *common, "--out", str(tmp_path / "run last"), "--sections", "A2,A3,A4", "--keep", "last",
            "--average-last", "2", "--epochs", "2", "--max-steps", "3", "--threads", "1", "--dropout", "0.1"]
    main(last)
    from mmap_train.model import read_checkpoint

    ck = read_checkpoint(tmp_path / "run last" / "checkpoint.pt")
    # the command line as given, read back by a shell: the folder with a space stays one argument
    assert shlex.split(ck["command"]) == ["mmap-train", *last]
    assert ck["config"]["backbone"] == "uni"
    assert ck["training_data"]["val_sections"] == [] and ck["training_data"]["train_sections"] == ["A2", "A3", "A4"]
    assert (ck["recipe"]["keep"], ck["recipe"]["average_last"], ck["config"]["dropout"]) == ("last", 2, 0.1)
    main(["evaluate", *common, "--checkpoint", str(tmp_path / "p2" / "checkpoint.pt"),
          "--json", str(tmp_path / "m.json"), "--sections", "A6,B2,B3"])
    m = json.loads((tmp_path / "m.json").read_text())
    for key in ("pcc_pooled", "pcc_per_slide", "mse", "mae", "n_spots", "n_constant_genes_pooled"):
        assert key in m
    spots = {s: len((real_data / "mmap_features" / "train" / f"{s}_spots.txt").read_text().split())
             for s in ("A6", "B2", "B3")}
    assert m["n_spots"] == sum(spots.values()) and sorted(m["per_section"]) == ["A6", "B2", "B3"]
    assert -1 <= m["pcc_pooled"] <= 1 and m["mse"] > 0
    # per patient (the sections' letter): B pools B2 and B3; its per-slide PCC is the mean of theirs
    b = m["per_patient"]["B"]
    assert sorted(m["per_patient"]) == ["A", "B"] and b["sections"] == ["B2", "B3"]
    assert b["n_spots"] == spots["B2"] + spots["B3"] and b["n_sections"] == 2
    assert b["pcc_per_slide"] == pytest.approx((m["per_section"]["B2"]["pcc"] + m["per_section"]["B3"]["pcc"]) / 2)
    assert m["per_patient"]["A"]["pcc_pooled"] == pytest.approx(m["per_section"]["A6"]["pcc"])
    mse_b = sum(m["per_section"][s]["mse"] * spots[s] for s in ("B2", "B3")) / b["n_spots"]
    assert b["mse"] == pytest.approx(mse_b)
    err = capsys.readouterr().err
    # stderr is not a terminal here (as in a SLURM log): progress comes as lines, never as redraws
    assert "\r" not in err and 2 <= sum(line.startswith("phase 2: ") for line in err.splitlines()) <= 2 * 12
    rows = [line.split() for line in err.splitlines() if line.startswith(("section ", "patient "))]
    assert [r[:3] for r in rows] == [["section", "A6", str(spots["A6"])], ["section", "B2", str(spots["B2"])],
                                     ["section", "B3", str(spots["B3"])], ["patient", "A", str(spots["A6"])],
                                     ["patient", "B", str(b["n_spots"])]]
    assert float(rows[-1][4]) == pytest.approx(b["pcc_per_slide"], abs=1e-4)


def test_cli_user_errors_are_one_line(tmp_path, capsys, real_data):
    from mmap_train.cli import main

    her2st = real_data / "her2st"
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--features", str(tmp_path / "nothing"),
              "--counts", str(her2st / "counts"), "--spots", str(her2st / "spots"),
              "--genes", str(her2st / "genes_785.txt"), "--json", str(tmp_path / "m.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nothing" in err and "Traceback" not in err
    assert not (tmp_path / "m.json").exists()


def test_shared_bank_forward_equals_the_fusion_head(cache):
    """The training fast path is FusionHead.forward, in train mode (dropout) and eval mode, both averagings."""
    from mmap_train.model import FusionHead

    feats, targets = cache
    for average in ("reference", "paper"):
        cfg = config_for_cache(GENES, "tiny", head_average=average)
        data = BankedSpots(prepare(feats, targets, ["S1", "S3"], cfg.prototype_rule), cfg.prototype_rule.max_bank)
        torch.manual_seed(1)
        head = FusionHead(cfg, DIM)
        rows = torch.arange(0, len(data), 3)
        f, bank, mask, y1, _ = data.batch(rows)
        for train_mode in (True, False):
            head.train(train_mode)
            torch.manual_seed(7)
            y_ref, h_ref = head(f, bank, mask, y1)
            torch.manual_seed(7)
            y, h = head.forward_shared(f, data.centroids, data.bank_idx[rows], mask, y1)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)


def test_cli_init_must_match_the_cache_and_genes(real_data, tmp_path, capsys):
    """phase2 --init: the cache's backbone (named, or its width) and --genes are checked against the checkpoint."""
    from mmap_train.cli import main
    from mmap_train.config import MMAPConfig
    from mmap_train.datasets import read_genes
    from mmap_train.features import write_cache_info, write_section
    from mmap_train.model import MMAP, save_checkpoint

    her2st = real_data / "her2st"
    genes = read_genes(her2st / "genes_785.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = MMAP(MMAPConfig(genes=genes, backbone="tiny", lora_last_blocks=0))
    save_checkpoint(tmp_path / "p1.pt", tiny, phase=1)
    ids = (real_data / "mmap_features" / "train" / "A3_spots.txt").read_text().split()
    rng = np.random.default_rng(0)
    # tiny-wide f with y1 of 785 or 12 genes; ViT-S-wide f from a cache that names its backbone
    for name, n_genes, dim in (("cache96", len(genes), DIM), ("cache96_12", 12, DIM), ("cache384", len(genes), 384)):
        write_section(tmp_path / name, SectionFeatures(
            "A3", ids, rng.normal(size=(len(ids), dim)).astype(np.float32),
            rng.normal(size=(len(ids), n_genes)).astype(np.float32)))
    write_cache_info(tmp_path / "cache384", "small", 384, "small.pt")
    (tmp_path / "genes12.txt").write_text("\n".join(genes[:12]) + "\n")
    common = ["phase2", "--init", str(tmp_path / "p1.pt"), "--counts", str(her2st / "counts"),
              "--spots", str(her2st / "spots"), "--out", str(tmp_path / "p2"), "--epochs", "1", "--threads", "1"]
    mismatch = "the phase-1 model (--init) does not match: "
    cases = [
        # the published cache is UNI's (1024-wide, naming no backbone), the checkpoint a tiny model
        (["--features", str(real_data / "mmap_features" / "train"), "--sections", "A3",
          "--genes", str(her2st / "genes_785.txt")], "cached features are 1024-wide but the model's tiny backbone gives 96"),
        (["--features", str(tmp_path / "cache384"), "--genes", str(her2st / "genes_785.txt")],
         mismatch + "backbone (small here, the feature cache's; tiny in the checkpoint)"),
        (["--features", str(tmp_path / "cache96_12"), "--genes", str(tmp_path / "genes12.txt")],
         mismatch + "genes (12 here, 785 in the checkpoint"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            main(common + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert not (tmp_path / "p2" / "checkpoint.pt").exists()
    # the matching cache and genes train
    main(common + ["--features", str(tmp_path / "cache96"), "--genes", str(her2st / "genes_785.txt"),
                   "--max-steps", "1", "--val-sections", ""])
    model, ckpt = load_checkpoint(tmp_path / "p2" / "checkpoint.pt")
    assert ckpt["encoder_trained"] is True and model.config.backbone == "tiny"
