"""Leave-one-patient-out CV of phase-2 recipes; weight averaging folded into one head; per-patient evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmap_train.cv import patient_folds, ridge_fit, summarise
from mmap_train.datasets import patient_of
from mmap_train.metrics import by_group, evaluate
from mmap_train.phase2 import BankedSpots, FusionHead, Phase2Recipe, config_for_cache, fit_fusion, prepare

GENES = [f"G{i}" for i in range(6)]
DIM = 96  # the tiny backbone's width


def test_patients_are_the_leading_letters():
    assert [patient_of(s) for s in ("A2", "B10", "GSM1", "007")] == ["A", "B", "GSM", "007"]
    assert patient_folds(["B2", "A3", "B1", "C1"]) == {"A": ["A3"], "B": ["B1", "B2"], "C": ["C1"]}
    from mmap_deploy.errors import UserError

    with pytest.raises(UserError, match="at least 2 patients"):
        patient_folds(["B1", "B2"])
    with pytest.raises(UserError, match="007"):
        patient_folds(["007", "B2"])
    # patients the data names (HEST metadata, a manifest column) win; the other sections go by their letters
    assert patient_folds(["007", "B2", "B3", "TENX9"], {"007": "p1", "TENX9": "p1"}) == {
        "B": ["B2", "B3"], "p1": ["007", "TENX9"]}


def test_ridge_fit_is_sklearns_ridge():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 20)) + 3
    y = x @ rng.normal(size=(20, 4)) + rng.normal(size=(80, 4)) + 1
    for alpha, (w, b) in ridge_fit(x, y, [0.1, 10.0, 1000.0]).items():
        r = Ridge(alpha=alpha).fit(x, y)
        np.testing.assert_allclose(x @ w + b, r.predict(x), rtol=1e-8, atol=1e-8)


def test_choice_needs_per_slide_wins_over_ridge():
    def fold(ridge, a, b):
        return {"y1": {"pcc_pooled": 0, "pcc_per_slide": 0, "mse": 1}, "ridge": {"pcc_pooled": 0, "pcc_per_slide": ridge, "mse": 1},
                "a": {"pcc_pooled": 0, "pcc_per_slide": a, "mse": 1}, "b": {"pcc_pooled": 0, "pcc_per_slide": b, "mse": 1}}

    # "a" has the better mean (one big fold) but beats ridge in 1 of 4 folds; "b" in 4 of 4
    res = {"candidates": {"a": {}, "b": {}},
           "folds": {"A": fold(0.1, 0.9, 0.11), "B": fold(0.1, 0.0, 0.11), "C": fold(0.1, 0.0, 0.11),
                     "D": fold(0.1, 0.0, 0.11)}}
    s = summarise(res)
    assert s["summary"]["a"]["wins_per_slide_vs_ridge"] == 1 and s["summary"]["b"]["wins_per_slide_vs_ridge"] == 4
    assert s["choice"] == {**s["choice"], "candidate": "b", "meets_rule": True, "min_wins_per_slide_vs_ridge": 3}
    assert s["summary"]["b"]["pcc_per_slide"]["mean"] == pytest.approx(0.11)
    assert s["summary"]["a"]["pcc_per_slide"]["sd"] == pytest.approx(np.std([0.9, 0, 0, 0], ddof=1))
    # nobody meets the rule: the best mean is kept, flagged
    res["folds"] = {k: fold(0.5, *(v["a"]["pcc_per_slide"], 0.11)) for k, v in res["folds"].items()}
    s = summarise(res)
    assert s["choice"]["candidate"] == "a" and s["choice"]["meets_rule"] is False


class _RecordingHead(FusionHead):
    """A fusion head that remembers its weights each time it is switched to evaluation (to validate an epoch)."""

    def train(self, mode: bool = True):
        if not mode:
            self.seen = getattr(self, "seen", []) + [{k: v.detach().clone() for k, v in super().state_dict().items()}]
        return super().train(mode)


def _sections():
    rng = np.random.default_rng(1)
    from mmap_train.datasets import Targets
    from mmap_train.features import SectionFeatures

    feats, targets = {}, {}
    w = rng.normal(size=(DIM, len(GENES))).astype(np.float32) / 10
    for s, n in (("A1", 50), ("B1", 40)):
        f = rng.normal(size=(n, DIM)).astype(np.float32)
        ids = [f"{i}x{s}" for i in range(n)]
        feats[s] = SectionFeatures(s, ids, f, (f @ w).astype(np.float32))
        targets[s] = Targets(ids, (f @ w + 1).astype(np.float32))
    return feats, targets


def test_weight_averaging_is_the_mean_of_the_last_epochs_and_one_onnx_graph(tmp_path):
    import onnxruntime as ort

    from export.bundle_writer import FUSION_INPUTS, FUSION_OUTPUTS, _export
    from export.graphs import FusionGraph

    feats, targets = _sections()
    cfg = config_for_cache(GENES, "tiny")
    data = BankedSpots(prepare(feats, targets, ["A1", "B1"], cfg.prototype_rule), cfg.prototype_rule.max_bank)
    torch.manual_seed(0)
    head = _RecordingHead(cfg, DIM)
    recipe = Phase2Recipe(epochs=4, batch_size=16, lr=1e-2, keep="last", average_last=3)
    history, _, kept = fit_fusion(cfg, head, data, data, recipe, progress=False)
    assert kept == 4 and history[-1]["averaged_epochs"] == 3
    # validated after each of the 4 epochs, then once more with the mean: the weights after epochs 2, 3 and 4
    assert len(head.seen) == 5
    epochs = head.seen[1:4]
    assert not torch.equal(epochs[0]["head_h.weight"], epochs[2]["head_h.weight"])
    assert torch.equal(head.seen[4]["head_h.weight"], head.state_dict()["head_h.weight"])
    for k, v in head.state_dict().items():
        mean = sum(e[k].double() for e in epochs) / 3
        torch.testing.assert_close(v, mean.float(), rtol=0, atol=1e-6)

    # the averaged head is an ordinary head: one fusion graph, same predictions under ONNX Runtime
    class Holder(torch.nn.Module):
        pass

    holder = Holder()
    holder.fusion = FusionHead(cfg, DIM)
    holder.fusion.load_state_dict({k: v for k, v in head.state_dict().items()})
    holder.fusion.eval()
    n = 5
    ex = (data.f[:n], data.centroids[data.bank_idx[:n]], data.mask[:n], data.y1[:n])
    path = tmp_path / "fusion.onnx"
    with torch.no_grad():
        _export(FusionGraph(holder).eval(), ex, path, FUSION_INPUTS, FUSION_OUTPUTS,
                {"f": {0: "batch"}, "bank": {0: "batch", 1: "bank"}, "mask": {0: "batch", 1: "bank"},
                 "y1": {0: "batch"}})
        want = holder.fusion(*ex)[0].numpy()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion.onnx"]  # one graph, weights inside
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in zip(FUSION_INPUTS, ex)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_recipe_checks():
    from mmap_deploy.errors import UserError

    with pytest.raises(UserError, match="keep='last'"):
        Phase2Recipe(keep="best", average_last=2).validate()
    with pytest.raises(UserError, match="0 .no averaging. or more"):
        Phase2Recipe(average_last=-1).validate()
    Phase2Recipe(epochs=3, average_last=5).validate()  # averages all 3 epochs


def test_by_group_is_evaluate_on_each_group():
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    sections = np.array(["A1"] * 10 + ["A2"] * 8 + ["B1"] * 12)
    g = by_group(pred, target, sections, patient_of)
    assert sorted(g) == ["A", "B"] and g["A"]["sections"] == ["A1", "A2"] and g["A"]["n_spots"] == 18
    a = evaluate(pred[:18], target[:18], sections[:18])
    assert g["A"]["pcc_pooled"] == pytest.approx(a["pcc_pooled"]) and g["A"]["mse"] == pytest.approx(a["mse"])
    assert g["A"]["pcc_per_slide"] == pytest.approx(a["pcc_per_slide"])
    assert g["B"]["pcc_pooled"] == pytest.approx(evaluate(pred[18:], target[18:], sections[18:])["pcc_pooled"])


def test_cli_cv_on_three_patients(real_data, tmp_path, capsys):
    """`mmap-train cv` end to end on real features and counts: 3 folds, 2 recipes, a few steps each."""
    from mmap_train.cli import main
    from mmap_train.datasets import her2st_sections, load_targets, read_genes
    from mmap_train.features import read_cache

    her2st = real_data / "her2st"
    cache = real_data / "mmap_features" / "train"
    out = tmp_path / "cv.json"
    main(["cv", "--features", str(cache), "--counts", str(her2st / "counts"), "--spots", str(her2st / "spots"),
          "--genes", str(her2st / "genes_785.txt"), "--json", str(out), "--sections", "A3,B2,C2,C3",
          "--candidates", "early-stop,e10-L32-avg5", "--epochs", "2", "--max-steps", "2", "--jobs", "2"])
    res = json.loads(out.read_text())
    assert list(res["folds"]) == ["A", "B", "C"] and res["patients"]["C"] == ["C2", "C3"]
    plain = {"y1", "ridge", "early-stop", "e10-L32-avg5"}
    assert set(res["summary"]) == plain | {f"{m}+smooth" for m in plain} | {"e10-L32-avg5:last"}
    for fold in res["folds"].values():
        assert fold["ridge"]["alpha"] in (10.0, 100.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0)
        assert len(fold["e10-L32-avg5"]["curve_pcc_per_slide"]) == 1  # 2 steps: one (partial) epoch
        # the smoothing is chosen on the training patients' grid: 3 radii x 5 weights
        assert len(fold["smoothing"]["inner_pcc_per_slide"]) == 15
        assert fold["smoothing"]["radius_um"] in (250.0, 300.0, 450.0)
    # y1 on the held-out patient C, scored independently
    genes = read_genes(her2st / "genes_785.txt")
    feats = read_cache(cache, ["C2", "C3"])
    t = {s.name: load_targets(s, genes) for s in her2st_sections(real_data, ["C2", "C3"])}
    y1 = np.concatenate([feats[s].y1 for s in ("C2", "C3")])
    tgt = np.concatenate([t[s].values[t[s].rows_for(feats[s].spot_ids, s)] for s in ("C2", "C3")])
    m = evaluate(y1, tgt, ["C2"] * len(feats["C2"].spot_ids) + ["C3"] * len(feats["C3"].spot_ids))
    assert res["folds"]["C"]["y1"]["pcc_per_slide"] == pytest.approx(m["pcc_per_slide"])
    assert res["folds"]["C"]["y1"]["n_spots"] == res["folds"]["C"]["e10-L32-avg5"]["n_spots"] == len(y1)
    # y1 smoothed with fold C's choice, recomputed here from the spot tables (µm from the spot lattice)
    from mmap_train.spatial import NeighbourSmoothing, section_positions, smooth_sections

    pos = {s.name: section_positions(s) for s in her2st_sections(real_data, ["C2", "C3"])}
    assert 0.68 < pos["C2"].mpp < 0.70
    xy = np.concatenate([pos[s].xy_for(feats[s].spot_ids) for s in ("C2", "C3")])
    labels = ["C2"] * len(feats["C2"].spot_ids) + ["C3"] * len(feats["C3"].spot_ids)
    choice = res["folds"]["C"]["smoothing"]
    ys = smooth_sections(y1, np.array(labels), xy, NeighbourSmoothing(choice["radius_um"], choice["weight"]))
    assert res["folds"]["C"]["y1+smooth"]["pcc_per_slide"] == pytest.approx(evaluate(ys, tgt, labels)["pcc_per_slide"])
    means = [res["folds"][p]["ridge"]["pcc_pooled"] for p in "ABC"]
    assert res["summary"]["ridge"]["pcc_pooled"]["mean"] == pytest.approx(np.mean(means))
    assert res["choice"]["candidate"] in res["summary"] and res["choice"]["n_folds"] == 3
    err = capsys.readouterr().err
    assert "| ridge |" in err and "chosen:" in err
