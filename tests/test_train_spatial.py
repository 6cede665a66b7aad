"""Spot positions in µm for cached sections, and the smoothing chosen inside the training folds."""

from __future__ import annotations

import numpy as np
import pytest
from mmap_train.datasets import Section
from mmap_train.spatial import choose_smoothing, section_positions, smooth_sections


def _her2st_table(path, mpp: float, n: int = 6):
    """A her2st-style spot table: an n x n ST lattice (200 µm pitch) at `mpp` µm per pixel."""
    lines = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    step = 200.0 / mpp
    for i in range(n):
        for j in range(n):
            lines.append(f"{i + 2}\t{j + 3}\t{i + 2}\t{j + 3}\t{100 + i * step:.2f}\t{50 + j * step:.2f}\t1")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("mpp", [0.625, 0.8])  # 320 and 250 px per 200 µm step
def test_positions_are_in_um_from_the_spot_lattice(tmp_path, mpp):
    coords = _her2st_table(tmp_path / "S1_selection.tsv", mpp)
    pos = section_positions(Section("S1", counts=tmp_path / "none.tsv.gz", coords=coords))
    assert pos.mpp == pytest.approx(mpp, rel=1e-12) and "spot lattice" in pos.mpp_source
    xy = pos.xy_for(["2x3", "3x3", "2x4"])
    np.testing.assert_allclose(np.hypot(*(xy[1:] - xy[0]).T), [200.0, 200.0], rtol=1e-12)
    # a manifest's mpp wins over the lattice
    given = section_positions(Section("S1", counts=tmp_path / "none.tsv.gz", coords=coords, mpp=0.5))
    assert given.mpp == 0.5 and given.mpp_source == "the manifest's mpp column"


def _fold(rng, noise: float, n: int = 12):
    ix, iy = np.meshgrid(np.arange(n), np.arange(n))
    xy = np.stack([ix.ravel(), iy.ravel()], axis=1) * 200.0
    # a smooth field per gene, plus noise on the predictions
    target = np.stack([np.sin(xy[:, 0] / 700 + k) + np.cos(xy[:, 1] / 900 - k) for k in range(5)], axis=1)
    pred = (target + noise * rng.normal(size=target.shape)).astype(np.float32)
    return pred, target.astype(np.float32), np.array(["S"] * len(xy)), xy


def test_choice_smooths_noisy_predictions_and_leaves_exact_ones():
    rng = np.random.default_rng(0)
    choice, scores = choose_smoothing([_fold(rng, 1.0), _fold(rng, 1.0)])
    assert choice.weight > 0 and len(scores) == 15
    assert scores[f"{choice.radius_um:g}:{choice.weight:g}"] == max(scores.values())
    # exact predictions: any smoothing lowers their correlation, so weight 0 (and the smallest radius, on the tie)
    exact = _fold(rng, 0.0)
    choice, _ = choose_smoothing([exact])
    assert (choice.radius_um, choice.weight) == (250.0, 0.0)
    assert smooth_sections(exact[0], exact[2], exact[3], choice).tobytes() == exact[0].tobytes()


def test_sections_are_smoothed_apart():
    # two sections whose spots coincide in µm: each is smoothed over its own spots only
    xy = np.array([[0.0, 0.0], [200.0, 0.0]] * 2)
    pred = np.array([[0.0], [2.0], [10.0], [30.0]], dtype=np.float32)
    labels = np.array(["A", "A", "B", "B"])
    from mmap_deploy.model.neighbours import NeighbourSmoothing

    out = smooth_sections(pred, labels, xy, NeighbourSmoothing(250.0, 1.0))
    np.testing.assert_allclose(out.ravel(), [1.0, 1.0, 20.0, 20.0])


def test_neighbour_slot_is_the_neighbours_mean_f_and_masked_without_any():
    import torch
    from mmap_train.phase2 import (
        BankedSpots,
        FusionHead,
        NeighbourBankedSpots,
        PreparedSection,
        config_for_cache,
        predict,
    )

    rng = np.random.default_rng(3)
    dim, genes, n = 96, ["G0", "G1", "G2"], 40
    f = rng.normal(size=(n, dim)).astype(np.float32)
    cents = rng.normal(size=(5, dim)).astype(np.float32)
    bank = np.stack([rng.permutation(5)[:3] for _ in range(n)])
    sec = PreparedSection("S", [f"s{i}" for i in range(n)], f, rng.normal(size=(n, 3)).astype(np.float32),
                          rng.normal(size=(n, 3)).astype(np.float32), cents, bank, 5, 3)
    xy = np.stack([np.arange(n) * 200.0, np.zeros(n)], axis=1)
    xy[-1] = [1e6, 0.0]  # far from the others: no neighbour
    plain = BankedSpots([sec], 4)
    data = NeighbourBankedSpots([sec], 4, [xy], 250.0)
    assert data.bank_idx.shape == (n, 5) and data.mask[:, -1].tolist() == [True] * (n - 1) + [False]
    slot = data.centroids[data.bank_idx[:, -1]].numpy()
    np.testing.assert_allclose(slot[0], f[1], rtol=1e-6)
    np.testing.assert_allclose(slot[5], (f[4] + f[6]) / 2, rtol=1e-6)
    torch.manual_seed(0)
    head = FusionHead(config_for_cache(genes, "tiny"), dim)
    a, b = predict(head, plain), predict(head, data)
    np.testing.assert_allclose(a[-1], b[-1], rtol=0, atol=1e-6)  # the masked slot changes nothing
    assert not np.allclose(a[0], b[0])


def test_phase2_writes_the_default_smoothing_and_evaluate_applies_it(real_data, tmp_path):
    import json

    from mmap_train.cli import main
    from mmap_train.model import read_checkpoint
    from mmap_train.spatial import DEFAULT_SMOOTHING

    her2st = real_data / "her2st"
    common = ["--features", str(real_data / "mmap_features" / "train"), "--counts", str(her2st / "counts"),
              "--spots", str(her2st / "spots"), "--genes", str(her2st / "genes_785.txt")]
    main(["phase2", *common, "--out", str(tmp_path / "p2"), "--sections", "B2,B3", "--epochs", "1",
          "--max-steps", "2", "--threads", "1"])
    ckpt = tmp_path / "p2" / "checkpoint.pt"
    assert read_checkpoint(ckpt)["config"]["neighbour_smoothing"] == DEFAULT_SMOOTHING.to_dict()
    got = {}
    for flag in ([], ["--no-smoothing"]):
        out = tmp_path / f"m{len(flag)}.json"
        main(["evaluate", *common, "--checkpoint", str(ckpt), "--json", str(out), "--sections", "C2,C3", *flag])
        got[bool(flag)] = json.loads(out.read_text())
    assert got[False]["neighbour_smoothing"] == {"radius_um": 250.0, "weight": 1.0}
    assert got[True]["neighbour_smoothing"] is None
    assert got[False]["n_spots"] == got[True]["n_spots"] and got[False]["mse"] != got[True]["mse"]
    # --smooth-weight 0: no smoothing in the checkpoint (nor, exported, in the bundle)
    main(["phase2", *common, "--out", str(tmp_path / "none"), "--sections", "B2,B3", "--epochs", "1",
          "--max-steps", "1", "--threads", "1", "--smooth-weight", "0"])
    assert read_checkpoint(tmp_path / "none" / "checkpoint.pt")["config"]["neighbour_smoothing"] is None
