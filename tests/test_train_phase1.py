"""Phase 1 on real patches (the demo sample, read by the runtime's slide reader): loss goes down, resume, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mmap_train.config import MMAPConfig
from mmap_train.datasets import Section, read_section_patches
from mmap_train.model import load_checkpoint
from mmap_train.phase1 import Phase1Recipe, SpotSet, predict_spots, train_phase1

GENES = [f"G{i}" for i in range(12)]


@pytest.fixture(scope="module")
def spots() -> SpotSet:
    from mmap_deploy.demo import sample_paths
    from mmap_deploy.inputs.coords import read_coords

    image, coords, mpp = sample_paths()
    cfg = MMAPConfig(genes=GENES, backbone="tiny", lora_last_blocks=0)
    xy = read_coords(coords).xy[:8]
    patches = read_section_patches(Section("B4", counts=coords, slide=image, coords=coords, mpp=mpp), xy, cfg.view_spec)
    targets = np.random.default_rng(0).normal(1.0, 0.5, (8, len(GENES))).astype(np.float32)
    return SpotSet(patches, targets, np.array(["B4a"] * 4 + ["B4b"] * 4), [f"s{i}" for i in range(8)])


def _cfg(**kw):
    return MMAPConfig(genes=GENES, backbone="tiny", lora_last_blocks=kw.pop("lora_last_blocks", 0), **kw)


def _recipe(**kw):
    base = dict(epochs=6, batch_size=8, lr=2e-3, min_lr=1e-4, mag_start_epoch=100, threads=1, seed=3)
    base.update(kw)
    return Phase1Recipe(**base)


def test_loss_goes_down_on_a_fixed_batch(spots, tmp_path):
    res = train_phase1(_cfg(), spots, spots, tmp_path, _recipe(), progress=False)
    losses = [r["train_loss"] for r in res["history"]]
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.isfinite(res["history"][-1]["val_pcc_pooled"])
    assert (tmp_path / "log.csv").read_text().startswith("epoch,")


def test_resume_repeats_an_uninterrupted_run(spots, tmp_path):
    recipe = _recipe(epochs=2, mag_start_epoch=1)  # the alignment loss joins in epoch 2
    train_phase1(_cfg(), spots, None, tmp_path / "a", recipe, progress=False)
    train_phase1(_cfg(), spots, None, tmp_path / "b", recipe, progress=False, stop_after_epoch=1)
    part, _ = load_checkpoint(tmp_path / "b" / "last.pt")
    res = train_phase1(_cfg(), spots, None, tmp_path / "b", recipe, progress=False, resume=True)
    assert [r["epoch"] for r in res["history"]] == [1, 2]
    a, _ = load_checkpoint(tmp_path / "a" / "last.pt")
    b, ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["epoch"] == 2
    sa, sb, sp = a.state_dict(), b.state_dict(), part.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sp[k]) for k in sa)  # epoch 2 did change the weights


def test_resume_without_a_run_is_a_user_error(spots, tmp_path):
    from mmap_deploy.errors import UserError

    with pytest.raises(UserError, match="nothing to resume"):
        train_phase1(_cfg(), spots, None, tmp_path, _recipe(), resume=True, progress=False)


def test_checkpoint_loads_and_predicts_the_same(spots, tmp_path):
    cfg = _cfg(lora_last_blocks=2)  # LoRA through peft: adapters and heads train, the base is frozen
    res = train_phase1(cfg, spots, spots, tmp_path, _recipe(epochs=1, max_steps=1), progress=False)
    model, ckpt = load_checkpoint(res["checkpoint"])
    assert ckpt["phase"] == 1 and ckpt["encoder_trained"] is True
    assert ckpt["config"]["genes"] == GENES
    _, y1 = predict_spots(model, spots, cfg.view_spec)
    f2, y2 = predict_spots(model, spots, cfg.view_spec)
    np.testing.assert_array_equal(y1, y2)  # centre crops: deterministic
    assert y1.shape == (8, 12) and np.isfinite(y1).all()


def test_gradient_accumulation_equals_the_large_batch(spots, tmp_path):
    """Two micro-batches of 4 accumulated make the same optimiser step as one batch of 8 (no dropout, MSE only)."""
    cfg = _cfg(dropout=0.0)
    base = dict(epochs=1, max_steps=1, augment=False)
    train_phase1(cfg, spots, None, tmp_path / "big", _recipe(batch_size=8, **base), progress=False)
    train_phase1(cfg, spots, None, tmp_path / "acc", _recipe(batch_size=4, accumulate=2, **base), progress=False)
    big, _ = load_checkpoint(tmp_path / "big" / "last.pt")
    acc, _ = load_checkpoint(tmp_path / "acc" / "last.pt")
    init = _cfg(dropout=0.0)
    torch.manual_seed(3)
    from mmap_train.model import MMAP

    fresh = MMAP(init).state_dict()
    sb, sa = big.state_dict(), acc.state_dict()
    moved = [k for k in sb if not torch.equal(sb[k], fresh[k])]
    assert moved  # the step did something
    for k in sb:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)


def test_prefetched_keeps_order_and_values():
    from mmap_train.phase1 import prefetched

    items = [np.arange(i, i + 3) for i in range(7)]
    want = [x * 2 for x in items]
    for threads in (0, 1, 3, 10):
        got = list(prefetched(lambda a: a * 2, items, threads))
        assert len(got) == 7 and all(np.array_equal(a, b) for a, b in zip(got, want))


def _bad_weights(path, state):
    import pickle

    if state == "junk":
        path.write_bytes(b"not a weights file")
    elif state == "pickled code":
        torch.save({"w": torch.zeros(1), "f": pickle.loads}, path)
    else:
        torch.save(state, path)
    return path


def _bad_weight_cases():
    import warnings

    from mmap_train.model import build_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = build_backbone(_cfg()).state_dict()
    wide = dict(sd, pos_embed=torch.zeros(1, 50, 64))
    return [
        ("missing", None, "backbone weights file not found; UNI's weights are gated"),
        ("junk", "junk", "refused: not a file of tensors only"),
        ("code", "pickled code", "refused: not a file of tensors only"),
        ("list", [torch.zeros(1)], "not a state dict (names to tensors) but a list"),
        ("strings", {"a": "b"}, "not a state dict (names to tensors) but a dict that does not map names to tensors"),
        ("checkpoint", {"config": {}, "state_dict": {}}, "an mmap-train checkpoint, not backbone weights"),
        ("prefix", {f"module.{k}": v for k, v in sd.items()}, "the file's keys start with 'module.'"),
        ("block", {k: v for k, v in sd.items() if not k.startswith("blocks.3.")},
         "do not fit the tiny backbone (vit_tiny_patch16_224: 4 blocks, width 96): "
         "14 missing key(s) (blocks.3.norm1.weight, blocks.3.norm1.bias, blocks.3.attn.qkv.weight, ...)"),
        ("shape", wide, "1 key(s) of another shape (pos_embed (1, 50, 64) (expected (1, 50, 96)))"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_backbone_weights_that_do_not_fit_are_one_line_user_errors(case, tmp_path):
    """--backbone-weights: a missing file, a file that is not a state dict, or keys or shapes that do not fit
    are one-line UserErrors naming the keys and the fix (they were FileNotFoundError, ValueError or
    RuntimeError tracebacks)."""
    from mmap_train.model import MMAP

    from mmap_deploy.errors import UserError

    name, state, message = _bad_weight_cases()[case]
    path = tmp_path / f"{name}.pth"
    if state is not None:
        _bad_weights(path, state)
    with pytest.raises(UserError) as e:
        MMAP(_cfg(), str(path))
    text = str(e.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text
    if name != "missing":
        assert text.endswith("or choose the --backbone the weights are for")


def test_backbone_weights_at_224_px_are_resampled_to_the_input_grid(tmp_path):
    """UNI's pos_embed is 14x14 (224 px); the model's is 7x7 (112 px): timm's ViT checkpoint filter resamples it."""
    import warnings

    from mmap_train.model import build_backbone
    from timm.layers import resample_abs_pos_embed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = build_backbone(_cfg()).state_dict()
    sd["pos_embed"] = torch.randn(1, 1 + 14 * 14, 96, generator=torch.Generator().manual_seed(0))
    torch.save({"state_dict": sd}, tmp_path / "vit224.pth")
    model = build_backbone(_cfg(), tmp_path / "vit224.pth")
    want = resample_abs_pos_embed(sd["pos_embed"], new_size=[7, 7], num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 50, 96) and torch.equal(model.pos_embed.data, want)
    assert torch.equal(model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_backbone_weights_from_a_local_file_stay_frozen_under_lora(spots, tmp_path):
    """--backbone-weights: the file's weights are loaded; with LoRA only the adapters (and heads) move."""
    import warnings

    from mmap_train.model import build_backbone

    cfg = _cfg(lora_last_blocks=2)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = build_backbone(cfg).state_dict()
    torch.save(weights, tmp_path / "vit.pth")
    res = train_phase1(cfg, spots, None, tmp_path / "run", _recipe(epochs=1, max_steps=2),
                       backbone_weights=str(tmp_path / "vit.pth"), progress=False)
    model, _ = load_checkpoint(res["checkpoint"])
    trained = model.encoder.backbones[0].base_model.model.state_dict()  # peft: base layers keep their names
    for k, v in weights.items():
        key = k.replace("attn.qkv.weight", "attn.qkv.base_layer.weight").replace("attn.qkv.bias", "attn.qkv.base_layer.bias") \
            .replace("attn.proj.weight", "attn.proj.base_layer.weight").replace("attn.proj.bias", "attn.proj.base_layer.bias")
        if key not in trained:
            key = k
        assert torch.equal(trained[key], v), k
    lora = {k: v for k, v in model.encoder.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # the adapters trained (lora_B starts at 0)
