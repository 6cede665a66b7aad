"""The bundle manifest: written by export, checked by the runtime, every failure named."""

import json
import shutil

import pytest

from mmap_deploy.errors import BundleError
from mmap_deploy.model.bundle import FORMAT_VERSION, MANIFEST_NAME, load_bundle, parse_manifest, sha256_file


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit(bundle, fn):
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_loads_and_round_trips(bundle):
    b = load_bundle(bundle)
    m = b.manifest
    assert m.genes[:2] == ["GENE0", "GENE1"] and m.embed_dim == 96
    assert m.view.patch_px == 224 and m.view.input_size == 112
    assert {(f.role, f.precision, f.format) for f in m.files} >= {("encoder", "fp32", "onnx"), ("fusion", "fp32", "onnx")}
    assert m.query_view == 2 and m.head_average == "reference"
    assert m.provenance["checkpoint_sha256"]
    again = parse_manifest(m.to_dict(), bundle / MANIFEST_NAME)
    assert again.to_dict() == m.to_dict()


def test_hash_mismatch_names_the_file_when_it_is_used(bundle):
    with open(bundle / "fusion.onnx", "ab") as fh:
        fh.write(b"\0")
    b = load_bundle(bundle)  # the manifest is fine; no model file is read yet
    assert b.path_of(b.select("encoder")) == bundle / "encoder.onnx"
    for _ in range(2):  # a failed check is not remembered as passed
        with pytest.raises(BundleError, match=r"fusion\.onnx: sha256 .* does not match.*re-export"):
            b.path_of(b.select("fusion"))


def test_each_file_is_hashed_once_and_only_when_used(bundle):
    b = load_bundle(bundle)
    assert b.hashed == []
    assert b.sha256() == sha256_file(bundle / MANIFEST_NAME)  # from the bytes read, not a second read
    enc = b.select("encoder")
    for _ in range(3):
        b.path_of(enc)
    assert b.hashed == ["encoder.onnx"]
    b.path_of(b.select("fusion"))
    assert b.hashed == ["encoder.onnx", "fusion.onnx"]
    assert load_bundle(bundle, verify_hashes=False).path_of(enc) == bundle / "encoder.onnx"


def test_unknown_version(bundle):
    _edit(bundle, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match="format version 2 is not supported.*upgrade mmap-deploy"):
        load_bundle(bundle)


@pytest.mark.parametrize("bad", ["../encoder.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_path_leaving_the_bundle(bundle, bad):
    _edit(bundle, lambda d: d["files"][0].update(path=bad))
    with pytest.raises(BundleError, match="leaves the bundle"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("genes"), "missing field 'genes'"),
        (lambda d: d.update(genes=[]), "'genes' must be a non-empty list"),
        (lambda d: d.update(genes=["A", "A"]), "duplicate"),
        (lambda d: d.update(mpp=-1), "'mpp' must be a positive"),
        (lambda d: d.update(input_size="112"), "'input_size' has the wrong type"),
        (lambda d: d.update(query_view=5), "'query_view' must index"),
        (lambda d: d.update(head_average="mean"), "'head_average' must be one of"),
        (lambda d: d["files"][0].update(precision="fp8"), r"'files\[0\].precision'"),
        (lambda d: d["files"][0].update(sha256="xyz"), "not a sha256"),
        (lambda d: d.update(files=[f for f in d["files"] if f["role"] != "fusion"]), "no fp32 ONNX 'fusion'"),
        (lambda d: d["prototypes"].update(k_min=100), "k_min' is larger"),
        (lambda d: d.update(format="something"), "not an MMAP bundle"),
        (lambda d: d.update(demo=1), "'demo' has the wrong type"),
    ],
)
def test_manifest_errors_name_the_field(bundle, edit, message):
    _edit(bundle, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_missing_things(bundle, tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")
    (bundle / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match="encoder.onnx but .* does not exist"):
        load_bundle(bundle)
    (bundle / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle)
    (bundle / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(bundle)


def test_select_says_how_to_add_a_missing_precision(bundle):
    b = load_bundle(bundle)
    assert b.select("encoder").path == "encoder.onnx"
    with pytest.raises(BundleError, match="mmap-export --fp16"):
        b.select("encoder", "fp16")


def test_no_dead_constants():
    """Issue 22: QUERY_VIEWS was never read (the manifest's query_view is checked against its views)."""
    import mmap_deploy.model.bundle as bundle_module

    assert not hasattr(bundle_module, "QUERY_VIEWS")
