"""Naming local and remote locations: URLs stay URLs, secrets never shown, a missing extra is one line."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmap_deploy.errors import UserError
from mmap_deploy.location import RemotePath, as_location, display, is_remote, redact_text, redact_url

SIGNED = ("https://alice:pa55@bucket.s3.amazonaws.com/cohort/A1.svs?X-Amz-Algorithm=AWS4-HMAC-SHA256"
          "&X-Amz-Credential=AKIAEXAMPLE%2F20240101&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600"
          "&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FQoGZXIvYXdzEJr&X-Amz-Signature=5d672d79c15b13162d9279b0855cfba6")
SECRETS = ("alice", "pa55", "AKIAEXAMPLE", "FQoGZXIvYXdzEJr", "5d672d79c15b13162d9279b0855cfba6")


def test_a_url_stays_a_url_and_a_local_path_a_path(tmp_path):
    for url in ("s3://bucket/cohort/A1.svs", "gs://bucket/A1.svs", "https://host.org/a/A1.svs", "http://h:8080/x.csv"):
        loc = as_location(url)
        assert isinstance(loc, RemotePath) and loc.url == url and str(loc) == url and is_remote(url)
    assert as_location(tmp_path / "a.svs") == tmp_path / "a.svs"
    assert as_location("rel/a.csv") == Path("rel/a.csv") and not is_remote("rel/a.csv")
    assert as_location("file:///data/a.svs") == Path("/data/a.svs")
    # a URL that went through pathlib (an older caller, a CLI type) is made a URL again
    assert as_location(Path("s3://bucket/cohort/A1.svs")).url == "s3://bucket/cohort/A1.svs"
    assert as_location(Path("https://host.org/a/A1.svs")).url == "https://host.org/a/A1.svs"
    with pytest.raises(UserError, match=r"^az://c/x: az:// is not read by this tool; use s3://"):
        as_location("az://c/x")
    with pytest.raises(UserError, match="no bucket in the URL"):
        as_location("s3:///key")


def test_names_parents_and_joins_of_a_folder_in_a_bucket():
    outs = as_location("s3://bucket/run1/outs/")
    table = outs / "spatial" / "tissue_positions.csv"
    assert table.url == "s3://bucket/run1/outs/spatial/tissue_positions.csv"
    assert (table.name, table.stem, table.suffix) == ("tissue_positions.csv", "tissue_positions", ".csv")
    assert table.parent.url == "s3://bucket/run1/outs/spatial/" and table.parent.parent == outs
    assert table.parts == ("bucket", "run1", "outs", "spatial", "tissue_positions.csv")
    assert (outs / "../slides/A1.svs").url == "s3://bucket/run1/slides/A1.svs"
    assert (outs / "/top.csv").url == "s3://bucket/top.csv"
    assert (outs / "gs://other/x.csv").url == "gs://other/x.csv"
    out = as_location("s3://bucket/results/A1.h5ad")
    assert out.with_name(".A1.h5ad.claim").url == "s3://bucket/results/.A1.h5ad.claim"
    assert out.with_suffix(".zarr").url == "s3://bucket/results/A1.zarr"
    assert as_location("s3://bucket/x.csv").parent.url == "s3://bucket/"
    with pytest.raises(UserError, match="goes above the bucket's root"):
        outs / "../../../x"
    # a signature is for one object: a sibling has none
    signed = as_location(SIGNED)
    assert signed.name == "A1.svs" and signed.parent.url == "https://alice:pa55@bucket.s3.amazonaws.com/cohort/"
    assert (signed.parent / "A1.csv").query == ""


def test_a_location_pickles_as_its_url():
    loc = as_location(SIGNED)
    again = pickle.loads(pickle.dumps(loc))
    assert again == loc and again.url == SIGNED and hash(again) == hash(loc)


def test_secrets_are_never_shown():
    loc = as_location(SIGNED)
    shown = [str(loc), repr(loc), display(SIGNED), redact_url(SIGNED),
             redact_text(f"ClientResponseError: 403, url='{SIGNED}'"), f"{loc.parent / 'x.csv'}"]
    for text in shown:
        assert not any(s in text for s in SECRETS), text
    assert str(loc) == ("https://***@bucket.s3.amazonaws.com/cohort/A1.svs?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                        "&X-Amz-Credential=***&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600"
                        "&X-Amz-SignedHeaders=***&X-Amz-Security-Token=***&X-Amz-Signature=***")
    # GCS and Azure signed URLs, tokens; a harmless parameter is kept
    gcs = redact_url("https://storage.googleapis.com/b/o.svs?X-Goog-Credential=svc%40p&X-Goog-Signature=abc&alt=media")
    assert gcs == "https://storage.googleapis.com/b/o.svs?X-Goog-Credential=***&X-Goog-Signature=***&alt=media"
    assert redact_url("https://a.blob.core.windows.net/c/x.svs?sv=2022&sig=S3CR3T") == \
        "https://a.blob.core.windows.net/c/x.svs?sv=2022&sig=***"
    assert redact_url("https://h/x?access_token=T0K3N&page=2") == "https://h/x?access_token=***&page=2"
    assert "abc" not in redact_text("failed: gs://b/x and https://h/y?sig=abc#frag")


def test_storage_options_are_secrets(monkeypatch):
    from mmap_deploy.location import access, naming

    monkeypatch.setattr(naming, "_secrets", set())
    monkeypatch.setattr(access, "_options", {})
    access.set_storage_options("s3", key="AKIAOPTIONKEY", secret="very-secret-value", endpoint_url="http://x")
    assert redact_text("signing with AKIAOPTIONKEY / very-secret-value failed") == "signing with *** / *** failed"
    access.reset_clients()


# A sitecustomize that makes fsspec (and the cloud clients) impossible to import: the extra is not installed.
BLOCK_FSSPEC = textwrap.dedent("""
    import importlib.abc, sys
    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("fsspec", "s3fs", "gcsfs"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, _Blocked())
""")


def test_a_remote_path_without_the_extra_is_one_line_naming_it(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_FSSPEC)
    table = tmp_path / "spots.csv"
    table.write_text("x,y\n10,20\n30,40\n")
    script = textwrap.dedent(f"""
        from mmap_deploy.errors import UserError
        from mmap_deploy.inputs.coords import read_coords
        print(len(read_coords({str(table)!r})))  # local tables need no extra
        try:
            import fsspec
        except ImportError:
            print("fsspec blocked")
        for url in ("s3://bucket/spots.csv", "https://host/spots.csv?X-Amz-Signature=SECRET"):
            try:
                read_coords(url)
            except UserError as e:
                print("error:", e)
    """)
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["2", "fsspec blocked"], r.stdout
    assert lines[2] == ("error: s3://bucket/spots.csv: reading s3:// needs the fsspec package, not installed here: "
                        "pip install 'mmap-deploy[cloud]'")
    assert lines[3].startswith("error: https://host/spots.csv?X-Amz-Signature=***: reading https:// needs the fsspec")
    assert "SECRET" not in r.stdout and len(lines) == 4


def test_importing_the_runtime_imports_no_storage_client():
    code = ("import sys, mmap_deploy, mmap_deploy.location, mmap_deploy.atomic, mmap_deploy.run.claims; "
            "print(sorted(m for m in ('fsspec', 's3fs', 'gcsfs', 'aiohttp', 'botocore') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
