"""Export parity: ONNX Runtime vs PyTorch, merged vs unmerged LoRA, padded vs unpadded banks."""

import subprocess
import sys
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_tiny_model, random_views
from mmap_export.bundle_writer import export_bundle
from mmap_export.graphs import deployable, fold_layerscale, merge_lora
from mmap_train.model import save_checkpoint

from mmap_deploy.model.bundle import load_bundle
from mmap_deploy.model.preprocess import make_views, normalise

RTOL = 1e-4  # fp32 ONNX vs torch, relative to the output's scale


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def torch_encoder(model, views):
    """The training-time path: numpy normalisation, unmerged LoRA model."""
    with torch.no_grad():
        f, y1, _ = model.encoder(torch.from_numpy(normalise(views, model.config.view_spec)))
    return f.numpy(), y1.numpy()


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def her2st_views(real_data, spec, n=12):
    """Views of real her2st spots, read with the runtime's own slide and coords readers."""
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.inputs.slide import open_slide

    spots = read_coords(real_data / "her2st" / "spots" / "C2_selection.tsv")
    with open_slide(real_data / "her2st" / "images" / "C2.jpg", mpp=0.73) as slide:
        idx = np.linspace(0, len(spots.ids) - 1, n).astype(int)
        return np.stack([make_views(slide.read_patch(*spots.xy[i], spec), spec) for i in idx])


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_model(seed=1)


def test_encoder_parity_random_views(tiny_bundle, tiny_model):
    views = random_views(7)
    f_ref, y_ref = torch_encoder(tiny_model, views)
    f, y1 = session(tiny_bundle / "encoder.onnx").run(None, {"views": views})
    assert f.shape == (7, 96) and y1.shape == (7, 12)
    # the bundle was exported from make_tiny_model(seed=0)
    f0, y0 = torch_encoder(make_tiny_model(seed=0), views)
    assert rel_err(f, f0) <= RTOL and rel_err(y1, y0) <= RTOL
    assert rel_err(f, f_ref) > 1e-2  # a different model really differs: the check can fail


def test_encoder_parity_real_patches(tiny_bundle, real_data):
    model = make_tiny_model(seed=0)
    views = her2st_views(real_data, model.config.view_spec)
    f_ref, y_ref = torch_encoder(model, views)
    f, y1 = session(tiny_bundle / "encoder.onnx").run(None, {"views": views})
    assert rel_err(f, f_ref) <= RTOL and rel_err(y1, y_ref) <= RTOL


@pytest.mark.parametrize("batch", [1, 5, 33])
def test_dynamic_batch(tiny_bundle, batch):
    views = random_views(batch, seed=batch)
    f, _ = session(tiny_bundle / "encoder.onnx").run(None, {"views": views})
    one, _ = session(tiny_bundle / "encoder.onnx").run(None, {"views": views[:1]})
    assert f.shape[0] == batch
    np.testing.assert_allclose(f[:1], one, rtol=1e-5, atol=1e-6)


def test_merged_lora_matches_unmerged():
    model = make_tiny_model(seed=2)
    views = random_views(4, seed=2)
    f_ref, y_ref = torch_encoder(model, views)
    merged = merge_lora(make_tiny_model(seed=2))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    f, y1 = torch_encoder(merged, views)
    assert rel_err(f, f_ref) <= 1e-5 and rel_err(y1, y_ref) <= 1e-5
    folded = fold_layerscale(merged)
    assert not any("ls1" in n or "ls2" in n for n, _ in folded.named_parameters())
    f2, y2 = torch_encoder(folded, views)
    assert rel_err(f2, f_ref) <= 1e-5 and rel_err(y2, y_ref) <= 1e-5


def test_fusion_parity_and_padding_mask(tiny_bundle):
    model = deployable(make_tiny_model(seed=0))
    rng = np.random.default_rng(0)
    n, l, pad = 6, 5, 9
    f = rng.normal(size=(n, 96)).astype(np.float32)
    y1 = rng.normal(size=(n, 12)).astype(np.float32)
    bank = rng.normal(size=(n, l, 96)).astype(np.float32)
    padded = np.concatenate([bank, rng.normal(size=(n, pad - l, 96)).astype(np.float32)], 1)  # junk padding
    mask = np.zeros((n, pad), bool)
    mask[:, :l] = True
    sess = session(tiny_bundle / "fusion.onnx")
    (y_unpadded,) = sess.run(None, {"f": f, "bank": bank, "mask": np.ones((n, l), bool), "y1": y1})
    (y_padded,) = sess.run(None, {"f": f, "bank": padded, "mask": mask, "y1": y1})
    np.testing.assert_allclose(y_padded, y_unpadded, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        y_ref, _ = model.fusion(torch.from_numpy(f), torch.from_numpy(padded), torch.from_numpy(mask), torch.from_numpy(y1))
    assert rel_err(y_padded, y_ref.numpy()) <= RTOL
    # without the mask the junk padding changes the answer: the mask matters
    (y_unmasked,) = sess.run(None, {"f": f, "bank": padded, "mask": np.ones((n, pad), bool), "y1": y1})
    assert np.abs(y_unmasked - y_unpadded).max() > 1e-4


@pytest.mark.parametrize("overrides", [{"shared_encoder": False}, {"query_view": 0, "head_average": "paper"}])
def test_variants_export_with_parity(tmp_path, overrides):
    model = make_tiny_model(seed=3, **overrides)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model)
    export_bundle(ckpt, tmp_path / "b")
    b = load_bundle(tmp_path / "b")
    assert b.manifest.query_view == model.config.query_view
    views = random_views(3, seed=5)
    f_ref, y_ref = torch_encoder(model, views)
    f, y1 = session(tmp_path / "b" / "encoder.onnx").run(None, {"views": views})
    assert rel_err(f, f_ref) <= RTOL and rel_err(y1, y_ref) <= RTOL


def test_mmap_export_cli(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    exe = [sys.executable, "-m", "mmap_export.cli"]
    r = subprocess.run([*exe, str(tiny_checkpoint), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert load_bundle(out).manifest.backbone == "tiny"
    again = subprocess.run([*exe, str(tiny_checkpoint), "-o", str(out)], capture_output=True, text=True)
    assert again.returncode != 0 and "pass --overwrite" in again.stderr
    missing = subprocess.run([*exe, str(tmp_path / "nope.pt"), "-o", str(tmp_path / "x")], capture_output=True, text=True)
    assert missing.returncode != 0 and "checkpoint not found" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_uni_geometry_exports_with_parity(tmp_path):
    """ViT-L/16 (UNI's geometry, random weights, LoRA on the last 9 blocks): export and run it."""
    from mmap_train.config import MMAPConfig
    from mmap_train.model import MMAP

    cfg = MMAPConfig(genes=[f"G{i}" for i in range(785)], backbone="uni")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MMAP(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    ckpt = tmp_path / "uni.pt"
    save_checkpoint(ckpt, model)
    views = random_views(2, seed=7)
    f_ref, y_ref = torch_encoder(model, views)
    del model
    export_bundle(ckpt, tmp_path / "uni")
    ckpt.unlink()
    b = load_bundle(tmp_path / "uni")
    assert b.manifest.embed_dim == 1024 and b.manifest.backbone == "uni"
    f, y1 = session(tmp_path / "uni" / "encoder.onnx").run(None, {"views": views})
    assert f.shape == (2, 1024) and y1.shape == (2, 785)
    assert rel_err(f, f_ref) <= RTOL and rel_err(y1, y_ref) <= RTOL


def test_checkpoint_without_trained_encoder_is_refused(tmp_path):
    """Phase 2 trained from cached features alone has a random encoder: exporting it is a user error."""
    model = make_tiny_model(seed=4)
    ckpt = tmp_path / "p2.pt"
    torch.save({"config": model.config.to_dict(), "encoder_trained": False,
                "state_dict": {k: v for k, v in model.state_dict().items() if k.startswith("fusion.")}}, ckpt)
    r = subprocess.run([sys.executable, "-m", "mmap_export.cli", str(ckpt), "-o", str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no trained encoder" in r.stderr and "--init" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "b").exists()


def test_external_data_bundle(tmp_path):
    """Weights saved beside the graph (as models over 2 GB must be) are listed, hashed and checked."""
    import json

    from mmap_deploy.errors import BundleError

    model = make_tiny_model(seed=6)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model)
    out = tmp_path / "b"
    export_bundle(ckpt, out, external_data=True)
    enc = load_bundle(out).select("encoder")
    assert enc.external_data == "encoder.onnx.data" and (out / "encoder.onnx.data").stat().st_size > 1e6
    assert (out / "encoder.onnx").stat().st_size < 1e6  # the graph alone
    views = random_views(3, seed=6)
    f_ref, y_ref = torch_encoder(model, views)
    f, y1 = session(out / "encoder.onnx").run(None, {"views": views})
    assert rel_err(f, f_ref) <= RTOL and rel_err(y1, y_ref) <= RTOL

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][0]["external_data"] = "../elsewhere.data"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="leaves the bundle"):
        load_bundle(out)
    manifest["files"][0]["external_data"] = "encoder.onnx.data"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with open(out / "encoder.onnx.data", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x07\x07")
    b = load_bundle(out)
    with pytest.raises(BundleError, match=r"encoder\.onnx\.data: sha256 .* does not match"):
        b.path_of(b.select("encoder"))
