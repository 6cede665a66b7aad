"""Property tests: no manifest, however malformed, makes the loader fail with anything but BundleError."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmap_deploy.errors import BundleError
from mmap_deploy.model.bundle import MANIFEST_NAME, load_bundle


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle, tmp_path_factory):
    """One copy of the tiny bundle whose manifest each example rewrites (model files untouched)."""
    bundle = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    return bundle


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


def _load(bundle_dir, text):
    (bundle_dir / MANIFEST_NAME).write_text(text)
    try:
        load_bundle(bundle_dir)
    except BundleError as e:
        msg = str(e)
        assert "\n" not in msg and str(bundle_dir) in msg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_arbitrary_text(tmp_path, text):
    _load(tmp_path, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_arbitrary_json(tmp_path, value):
    _load(tmp_path, json.dumps(value))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_real_manifest_with_one_field_replaced(fuzz_bundle, tiny_bundle, data):
    """Start from a valid manifest and replace one (possibly nested) field with junk."""
    bundle = fuzz_bundle
    manifest = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    target = manifest
    path = []
    while isinstance(target, (dict, list)) and target:
        keys = list(target.keys()) if isinstance(target, dict) else list(range(len(target)))
        key = data.draw(st.sampled_from(keys))
        path.append(key)
        if data.draw(st.booleans()) or not isinstance(target[key], (dict, list)):
            break
        target = target[key]
    if path:
        target[path[-1]] = data.draw(json_values)
    elif isinstance(target, dict):
        target.clear()
    _load(bundle, json.dumps(manifest))
