"""Per-gene PCC, the gene subsets of published tables (HVG 50, HEG 250) and the familiarity report, in
`mmap-train evaluate` and `mmap-train cv`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmap_train.metrics import evaluate, familiarity_report, gene_subsets, pearson_per_gene, subset_scores


def _data(n=60, g=300, seed=0):
    rng = np.random.default_rng(seed)
    target = np.log10(1 + rng.gamma(0.5, 4.0, size=(n, g)) * rng.random(g) * 3)
    pred = target + rng.normal(scale=0.5, size=(n, g))
    sections = np.array(["S1"] * (n // 3) + ["S2"] * (n // 3) + ["S3"] * (n - 2 * (n // 3)))
    return pred, target, sections


def test_subsets_are_the_most_variable_and_most_expressed_genes_of_the_training_spots():
    _, train, _ = _data(seed=1)
    s = gene_subsets(train)
    assert [len(s[k]) for k in ("hvg50", "heg250", "all")] == [50, 250, 300]
    var = train.var(axis=0)
    assert var[s["hvg50"]].min() >= np.delete(var, s["hvg50"]).max()
    counts = (10 ** train - 1).mean(axis=0)  # counts per 10 000, not the log target's mean
    assert counts[s["heg250"]].min() >= np.delete(counts, s["heg250"]).max()


def test_subset_scores_are_means_of_the_per_gene_pcc_pooled_and_per_slide():
    pred, target, sections = _data()
    subsets = gene_subsets(_data(seed=1)[1])
    got = subset_scores(pred, target, sections, subsets)
    r = pearson_per_gene(pred, target)
    np.testing.assert_allclose([v for v in got["pcc_per_gene"]], np.round(r, 5))
    for name, idx in subsets.items():
        assert got["subsets"][name]["pcc_pooled"] == pytest.approx(r[idx].mean())
        m = evaluate(pred[:, idx], target[:, idx], sections)
        assert got["subsets"][name]["pcc_per_slide"] == pytest.approx(m["pcc_per_slide"])
    assert got["subsets"]["all"]["pcc_pooled"] == pytest.approx(evaluate(pred, target, sections)["pcc_pooled"])


def test_familiarity_report_scores_the_most_familiar_spots():
    from scipy.stats import spearmanr

    pred, target, sections = _data()
    fam = np.random.default_rng(3).random(len(pred))
    fam[:5] = 0.01  # five unfamiliar spots, all in S1
    rep = familiarity_report(fam, pred, target, sections, 0.05, 0.25)
    err = ((pred - target) ** 2).mean(axis=1)
    assert rep["spearman_error"] == pytest.approx(spearmanr(fam, err).statistic)
    top = np.sort(np.argsort(-fam, kind="stable")[:30])
    assert rep["familiar_50"]["n_spots"] == 30 and rep["familiar_80"]["n_spots"] == 48
    assert rep["familiar_50"]["pcc_pooled"] == pytest.approx(evaluate(pred[top], target[top], sections[top])["pcc_pooled"])
    assert rep["all"]["pcc_pooled"] == pytest.approx(evaluate(pred, target, sections)["pcc_pooled"])
    low = fam < 0.05
    assert rep["unfamiliar"]["n"] == int(low.sum()) and rep["unfamiliar"]["mse_unfamiliar"] == pytest.approx(err[low].mean())
    assert rep["per_section"]["S1"]["share_unfamiliar"] == pytest.approx(low[:20].mean())
    assert rep["per_section"]["S1"]["slide_line"] is True and rep["per_section"]["S2"]["slide_line"] is False


def test_cli_evaluate_and_cv_report_per_gene_pcc_subsets_and_familiarity(real_data, tmp_path):
    from mmap_train.cli import main
    from mmap_train.datasets import her2st_sections, load_targets, read_genes
    from mmap_train.features import read_cache

    her2st = real_data / "her2st"
    cache = real_data / "mmap_features" / "train"
    common = ["--features", str(cache), "--counts", str(her2st / "counts"), "--spots", str(her2st / "spots"),
              "--genes", str(her2st / "genes_785.txt")]
    main(["phase2", *common, "--out", str(tmp_path / "p2"), "--sections", "B2,B3,C2", "--epochs", "1",
          "--max-steps", "2", "--threads", "1"])
    assert (tmp_path / "p2" / "familiarity.npz").is_file()
    main(["evaluate", *common, "--checkpoint", str(tmp_path / "p2" / "checkpoint.pt"), "--json", str(tmp_path / "m.json"),
          "--sections", "C3,D2"])
    m = json.loads((tmp_path / "m.json").read_text())
    assert len(m["pcc_per_gene"]) == 785 and set(m["subsets"]) == {"hvg50", "heg250", "all"}
    assert m["subsets"]["all"]["pcc_pooled"] == pytest.approx(m["pcc_pooled"])
    assert m["gene_subsets_defined_on"].startswith("training sections of the checkpoint (B2, B3, C2)")
    # HVG 50 recomputed from the training sections' cached spots
    genes = read_genes(her2st / "genes_785.txt")
    feats = read_cache(cache, ["B2", "B3", "C2"])
    tg = {s.name: load_targets(s, genes) for s in her2st_sections(real_data, ["B2", "B3", "C2"])}
    train = np.concatenate([tg[n].values[tg[n].rows_for(feats[n].spot_ids, n)] for n in ("B2", "B3", "C2")])
    hvg = gene_subsets(train)["hvg50"]
    per_gene = np.array([np.nan if v is None else v for v in m["pcc_per_gene"]])
    assert m["subsets"]["hvg50"]["pcc_pooled"] == pytest.approx(np.nanmean(per_gene[hvg]), abs=1e-5)
    assert set(m["y1"]["subsets"]) == {"hvg50", "heg250", "all"} and len(m["y1"]["pcc_per_gene"]) == 785
    assert m["familiarity"]["all"]["n_spots"] == m["n_spots"] and -1 <= m["familiarity"]["spearman_error"] <= 1

    out = tmp_path / "cv.json"
    main(["cv", *common, "--json", str(out), "--sections", "A3,B2,C2,C3", "--candidates", "e10-L32-paper-avg5",
          "--epochs", "1", "--max-steps", "1"])
    res = json.loads(out.read_text())
    for fold in res["folds"].values():
        for model in ("y1", "ridge", "e10-L32-paper-avg5", "e10-L32-paper-avg5+smooth"):
            assert len(fold[model]["pcc_per_gene"]) == 785 and set(fold[model]["subsets"]) == {"hvg50", "heg250", "all"}
            assert fold[model]["familiarity"]["all"]["n_spots"] == fold["n_spots"]
        assert len(fold["familiarity"]["values"]) == fold["n_spots"] == len(fold["familiarity"]["spot_ids"])
        assert len(fold["familiarity"]["error"]["e10-L32-paper-avg5+smooth"]) == fold["n_spots"]
        assert len(fold["familiarity"]["gene_subsets"]["hvg50"]) == 50
    s = res["summary"]["e10-L32-paper-avg5+smooth"]
    assert s["subsets"]["hvg50"]["pcc_pooled"]["mean"] == pytest.approx(
        np.mean([f["e10-L32-paper-avg5+smooth"]["subsets"]["hvg50"]["pcc_pooled"] for f in res["folds"].values()]))
    assert res["familiarity_rule_folds"]["n_folds"] == 3 and res["familiarity_rule_folds"]["needed"] == 2
