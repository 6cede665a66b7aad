"""Small objects written on a condition: what a claim on a bucket is made of.

A bucket has no `O_EXCL` and no rename, but both stores compare and swap
one object:

| | create only if absent | replace only if unchanged | delete only if unchanged |
|---|---|---|---|
| S3 | PutObject `If-None-Match: *` | PutObject `If-Match: ETAG` | DeleteObject `If-Match: ETAG` |
| GCS | upload `ifGenerationMatch=0` | upload `ifGenerationMatch=GEN` | delete `ifGenerationMatch=GEN` |

Of two writers with the same condition exactly one succeeds; the other is
told (`False`), never an error. An S3-compatible store without these
conditions (older MinIO, Ceph) answers `NotImplemented`: said in one line,
since claims would not be safe there. A store that does not take a
condition on DELETE gets a read, a comparison and a plain delete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .access import NOT_FOUND, OTHER, PRECONDITION, call, call_or, classify, fs_path, info, storage_error
from .path import RemotePath
from .transfer import require_writable


@dataclass
class Versioned:
    """An object's content, its version tag (S3 ETag, GCS generation) and its age in seconds (store's clock)."""

    data: bytes
    tag: str
    age_s: float


def _not_supported(loc: RemotePath, exc: BaseException) -> bool:
    text = str(exc)
    return "NotImplemented" in text or "not implemented" in text.lower() or getattr(exc, "errno", None) == 38


def _answer(loc: RemotePath, what: str, write: Any) -> Any:
    """Run a conditional write: its response, or None when the condition did not hold (or the object is gone)."""
    try:
        return call(loc, what, write, write=True, passthrough=(PRECONDITION, NOT_FOUND, OTHER))
    except UserError:
        raise
    except Exception as e:
        kind = classify(e)
        if kind in (PRECONDITION, NOT_FOUND):
            return None
        if _not_supported(loc, e):
            raise UserError(f"{loc}: this store does not support conditional writes ({what}), so two runs could "
                            "write one slide; use AWS S3, GCS or a store with If-None-Match/If-Match, or run "
                            "one batch at a time with a local -o") from None
        raise storage_error(loc, what, e, kind, write=True) from None


def read_versioned(loc: RemotePath) -> Versioned | None:
    """The object with its version tag and age; None when there is none."""
    if loc.scheme == "s3":
        import fsspec.asyn

        bucket, key = loc.bucket, loc.key

        def get(fs: Any) -> tuple[bytes, str, Any]:
            async def fetch() -> tuple[bytes, str, Any]:
                r = await fs._call_s3("get_object", Bucket=bucket, Key=key)
                async with r["Body"] as body:
                    return await body.read(), str(r["ETag"]), r["LastModified"]

            return fsspec.asyn.sync(fs.loop, fetch)

        found = call_or(loc, "reading the claim", get, {NOT_FOUND: None})
        if found is None:
            return None
        data, tag, modified = found
        return Versioned(data, tag, time.time() - modified.timestamp())
    found = info(loc, "reading the claim")
    if found is None:
        return None
    data = call_or(loc, "reading the claim", lambda fs: fs.cat_file(fs_path(loc)), {NOT_FOUND: None})
    if data is None:
        return None
    # read after the tag: a newer content with an older tag makes a later compare-and-swap fail, which is safe
    return Versioned(data, found.tag, time.time() - found.st_mtime if found.st_mtime else 0.0)


def _tag(response: Any) -> str | None:
    """The new version tag from a write's response (S3: ETag; GCS: the object's generation)."""
    if response is None:
        return None
    if isinstance(response, dict):
        return str(response.get("ETag") or response.get("generation") or "")
    return ""


def _gcs_upload(loc: RemotePath, data: bytes, generation: str) -> Any:
    """GCS's media upload on the condition `ifGenerationMatch` (0: only if there is no such object)."""
    return lambda fs: fs.call("POST", f"{fs._location}/upload/storage/v1/b/{{}}/o", loc.bucket, uploadType="media",
                              name=loc.key, ifGenerationMatch=str(generation), data=data, json_out=True,
                              headers={"Content-Type": "application/octet-stream"})


def create_exclusive(loc: RemotePath, data: bytes) -> str | None:
    """Create the object only if there is none: its version tag, or None when one was there."""
    require_writable(loc)
    if loc.scheme == "s3":
        return _tag(_answer(loc, "creating the claim", lambda fs: fs.call_s3(
            "put_object", Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")))
    return _tag(_answer(loc, "creating the claim", _gcs_upload(loc, data, "0")))


def replace_if_unchanged(loc: RemotePath, data: bytes, tag: str) -> str | None:
    """Replace the object only if its version is still `tag`: the new tag, or None when it changed (or is gone)."""
    require_writable(loc)
    if loc.scheme == "s3":
        return _tag(_answer(loc, "renewing the claim", lambda fs: fs.call_s3(
            "put_object", Bucket=loc.bucket, Key=loc.key, Body=data, IfMatch=tag)))
    return _tag(_answer(loc, "renewing the claim", _gcs_upload(loc, data, tag)))


def delete_if_unchanged(loc: RemotePath, tag: str) -> bool:
    """Delete the object only if its version is still `tag`: True when this call deleted it."""
    require_writable(loc)
    if loc.scheme != "s3":
        return _answer(loc, "removing the claim", lambda fs: fs.call(
            "DELETE", "b/{}/o/{}", loc.bucket, loc.key, ifGenerationMatch=str(tag))) is not None
    try:
        return _answer(loc, "removing the claim", lambda fs: fs.call_s3(
            "delete_object", Bucket=loc.bucket, Key=loc.key, IfMatch=tag)) is not None
    except UserError as e:
        if "does not support conditional writes" not in str(e):
            raise
    now = read_versioned(loc)  # a store without conditional deletes: compare, then delete
    if now is None or now.tag != tag:
        return False
    from .transfer import remove

    remove(loc)
    return True
