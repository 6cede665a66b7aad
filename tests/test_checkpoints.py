"""Checkpoints are data, not code: written as plain types, read with torch.load(weights_only=True).

A checkpoint carrying any other pickled object (here a function that a
malicious file could call while being unpickled) is refused, with one line
that names the file, by every command that opens one.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from mmap_deploy.errors import UserError


@pytest.fixture()
def pickled_callable(tiny_checkpoint, tmp_path):
    """The tiny checkpoint plus a pickled reference to os.system: loadable only by full unpickling."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["on_load"] = os.system
    path = tmp_path / "untrusted.pt"
    torch.save(ckpt, path)
    return path


def _one_line_refusal(capsys, path) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert str(path) in err and "refused" in err and "posix.system" in err
    return err


def test_written_checkpoints_are_plain_data(tiny_checkpoint):
    from mmap_train.model import load_checkpoint

    ckpt = torch.load(tiny_checkpoint, weights_only=True)  # would raise on any pickled object
    assert isinstance(ckpt["config"], dict) and isinstance(ckpt["config"]["genes"], list)
    model, again = load_checkpoint(tiny_checkpoint)
    assert again["phase"] == 2 and model.config.genes == ckpt["config"]["genes"]


def test_metadata_is_made_plain_or_refused():
    from mmap_train.model import plain

    out = plain({"a": np.float32(0.5), "b": [np.int64(3), (1, 2)], "c": np.zeros(2, np.float32)})
    assert out["a"] == 0.5 and type(out["a"]) is float and out["b"] == [3, (1, 2)] and type(out["b"][0]) is int
    assert isinstance(out["c"], torch.Tensor)
    with pytest.raises(TypeError, match=r"checkpoint\['hook'\]: function is not checkpoint data"):
        plain({"hook": lambda: None})


def test_load_checkpoint_refuses_pickled_code(pickled_callable):
    from mmap_train.model import load_checkpoint
    from mmap_train.phase2 import load_fusion, load_init

    for load in (load_checkpoint, load_fusion, load_init):
        with pytest.raises(UserError, match=r"untrusted\.pt: refused: the checkpoint carries pickled objects "
                                            r"\(posix\.system\)"):
            load(pickled_callable)


def test_mmap_export_refuses_pickled_code(pickled_callable, tmp_path, capsys):
    from mmap_export.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(pickled_callable), "-o", str(tmp_path / "bundle")])
    assert e.value.code == 2
    _one_line_refusal(capsys, pickled_callable)
    assert not (tmp_path / "bundle").exists()


def test_mmap_train_commands_refuse_pickled_code(pickled_callable, real_data, tmp_path, capsys):
    """evaluate, phase2 --init and features, on a small section of the published features."""
    from mmap_train.cli import main

    her2st = real_data / "her2st"
    cache = ["--features", str(real_data / "mmap_features" / "train"), "--sections", "A2",
             "--counts", str(her2st / "counts"), "--spots", str(her2st / "spots"),
             "--genes", str(her2st / "genes_785.txt")]
    runs = [
        ["evaluate", "--checkpoint", str(pickled_callable), *cache, "--json", str(tmp_path / "m.json")],
        ["phase2", "--init", str(pickled_callable), *cache, "--out", str(tmp_path / "p2")],
        ["features", "--data-dir", str(real_data), "--sections", "B4", "--checkpoint", str(pickled_callable),
         "--out", str(tmp_path / "cache")],
    ]
    for argv in runs:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv[0]
        _one_line_refusal(capsys, pickled_callable)
    assert not any((tmp_path / p).exists() for p in ("m.json", "p2", "cache"))


def test_resume_refuses_pickled_code(pickled_callable, tmp_path):
    from mmap_train.config import MMAPConfig
    from mmap_train.phase1 import Phase1Recipe, SpotSet, train_phase1

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(pickled_callable.read_bytes())
    spots = SpotSet(np.zeros((2, 224, 224, 3), np.uint8), np.zeros((2, 12), np.float32), np.array(["S", "S"]))
    cfg = MMAPConfig(genes=[f"GENE{i}" for i in range(12)], backbone="tiny", lora_last_blocks=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match=r"last\.pt: refused: the checkpoint carries pickled objects"):
            train_phase1(cfg, spots, None, tmp_path / "run", Phase1Recipe(epochs=1), resume=True, progress=False)


def test_flat_configs_of_older_checkpoints_still_load(tiny_checkpoint, tmp_path):
    """Before the view spec and the prototype rule were nested, configs held their fields flat."""
    from mmap_train.model import load_checkpoint

    from mmap_deploy.model.prototypes import PrototypeRule

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    flat = {k: v for k, v in ckpt["config"].items() if k not in ("view_spec", "prototype_rule")}
    flat.update(input_size=112, patch_um=100.0, mpp=0.5, crop_fractions=[1.0, 0.5, 0.25],
                k_min=8, k_max=40, k_divisor=4, l_ratio=0.5, l_fixed=6)
    torch.save(dict(ckpt, config=flat), tmp_path / "old.pt")
    model, _ = load_checkpoint(tmp_path / "old.pt")
    spec = model.config.view_spec
    assert (spec.patch_um, spec.mpp, spec.input_size, spec.crop_fractions) == (100.0, 0.5, 112, (1.0, 0.5, 0.25))
    assert spec.mean == (0.485, 0.456, 0.406)  # the backbone's normalisation: what those models were trained with
    assert model.config.prototype_rule == PrototypeRule(8, 40, 4, 0.5, 6)
    reference, _ = load_checkpoint(tiny_checkpoint)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
