"""Slide claims: two runs over one manifest never predict and write the same slide at once.

Before a batch (local, `--shard`, or on Ray) works on a slide it creates the
claim file `.{output name}.claim` beside the output with
`O_CREAT | O_EXCL`, which is atomic on local filesystems and on NFSv3 and
later: of two runs, exactly one creates it; the other skips the slide and
says who holds it. The claim records host, pid, run id and start time; its
holder refreshes its mtime every `HEARTBEAT_S` seconds and removes it once
the output has been renamed into place.

A claim is stale, and is taken over, when
- it was made by this very run (a worker of the run died on the slide);
- its host is this host and its pid no longer runs (a killed run);
- its mtime is older than `STALE_AFTER_S` (its host went away: no heartbeat).
A stale claim is renamed aside before it is replaced, and put back when what
was renamed turns out to be a fresh claim, so two runs that both judge one
claim stale still end up with a single holder.

Why not flock(2), which frees itself when its holder dies: it is missing or
local-only on some shared filesystems (Lustre mounted without `-o flock`,
NFS without a lock daemon) and cannot say who holds a slide; a claim file
works wherever `O_EXCL` does and names its holder.

Caveats: the mtime rule compares the file server's clock (it stamps the
heartbeat) with this host's, so keep clocks within minutes (NTP);
`O_EXCL` is not atomic on NFSv2 and on some FUSE filesystems.

**On a bucket** (`-o s3://...`, `gs://...`) the claim is an object beside
the output, written on a condition (`location.objects`): created only if
absent (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`), so of two runs
exactly one creates it. Its holder renews it every `HEARTBEAT_S` (a
rewrite on the condition that it is still the version this run wrote,
which refreshes the store's modification time) and deletes it on the same
condition. The staleness rules are those above, the age read from the
store's clock; a stale claim is replaced by a compare-and-swap on the
version that was judged stale, so two runs that both judge it stale still
end up with a single holder. Each claim holds a random nonce, so no two
claims are the same bytes (an S3 ETag is the content's MD5).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..location import RemotePath, as_location

HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


def new_run_id() -> str:
    """A token that tells this run's claims from every other run's."""
    return uuid.uuid4().hex[:16]


def claim_path(out: Union[Path, RemotePath]) -> Union[Path, RemotePath]:
    """The claim file of an output: hidden, beside it (an object beside it, in a bucket)."""
    out = as_location(out)
    return out.with_name(f".{out.name}.claim")


@dataclass
class ClaimHolder:
    """Who holds a claim, as read from its file."""

    host: str
    pid: int
    run: str
    started: str
    age_s: float

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.started}"


class SlideClaim:
    """A held claim: refreshed in the background until `release()` (a context manager)."""

    def __init__(self, path: Path, heartbeat_s: float = HEARTBEAT_S):
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name="mmap-claim-heartbeat")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            if not self._refresh():
                return

    def _refresh(self) -> bool:
        """Renew the claim; False when there is nothing left to renew."""
        try:
            os.utime(self.path)
        except OSError:  # removed by hand, or the folder is gone: nothing to refresh
            return False
        return True

    def release(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "SlideClaim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BucketClaim(SlideClaim):
    """A held claim in a bucket: renewed and removed on the condition that it is still this run's version."""

    def __init__(self, path: RemotePath, tag: str, data: bytes, heartbeat_s: float = HEARTBEAT_S):
        self.tag, self.data = tag, data
        super().__init__(path, heartbeat_s)

    def _refresh(self) -> bool:
        from ..errors import UserError
        from ..location.objects import replace_if_unchanged

        try:
            tag = replace_if_unchanged(self.path, self.data, self.tag)
        except UserError:  # the store failed for now (retries said so): try again at the next beat
            return True
        if tag is None:  # taken over (judged stale) or removed: no longer ours to renew
            return False
        self.tag = tag
        return True

    def release(self) -> None:
        from ..errors import UserError
        from ..location.objects import delete_if_unchanged

        self._stop.set()
        self._thread.join()  # no renewal may land after the removal
        try:
            delete_if_unchanged(self.path, self.tag)
        except UserError:  # the slide is done; a claim left behind goes stale and is taken over
            pass


def _holder(text: str | bytes, age: float) -> ClaimHolder:
    try:
        d = json.loads(text)
        return ClaimHolder(str(d["host"]), int(d["pid"]), str(d["run"]), str(d["started"]), age)
    except (ValueError, KeyError, TypeError):
        return ClaimHolder("?", -1, "?", "?", age)


def _claim_bytes(run_id: str) -> bytes:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "run": run_id,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "nonce": uuid.uuid4().hex}
    return json.dumps(info).encode()


def read_holder(path: Union[Path, RemotePath]) -> ClaimHolder | None:
    """The claim's holder; None when there is no claim. A claim being written reads as a fresh unknown holder."""
    if isinstance(path, RemotePath):
        from ..location.objects import read_versioned

        found = read_versioned(path)
        return None if found is None else _holder(found.data, found.age_s)
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    return _holder(text, age)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_stale(holder: ClaimHolder, run_id: str, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether a claim's holder is gone (see the module docstring for the rules)."""
    if holder.run == run_id:
        return True
    if holder.host == socket.gethostname() and holder.pid > 0 and not _pid_alive(holder.pid):
        return True
    return holder.age_s > stale_after_s


def _create(path: Path, run_id: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, _claim_bytes(run_id))
    except OSError:  # a full disk: leave no empty claim behind
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _take_over(path: Path, stale: ClaimHolder) -> None:
    """Remove a stale claim, unless another run replaced it since we read it."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    now = read_holder(aside)
    key = (stale.host, stale.pid, stale.run, stale.started)
    if now is not None and (now.host, now.pid, now.run, now.started) != key:
        try:  # a fresh claim was renamed: put it back (link fails if a third run claimed meanwhile)
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)


def try_claim(out: Union[Path, RemotePath], run_id: str, *, stale_after_s: float = STALE_AFTER_S,
              heartbeat_s: float = HEARTBEAT_S) -> SlideClaim | ClaimHolder:
    """Claim `out` for this run: a `SlideClaim` to hold, or the `ClaimHolder` of a live claim.

    OSErrors (a full disk, a folder that cannot be written) propagate; on a
    bucket, the store's failures are one-line UserErrors (OutputStorageError
    when it cannot be written at all).
    """
    path = claim_path(out)
    if isinstance(path, RemotePath):
        return _try_claim_bucket(path, run_id, stale_after_s, heartbeat_s)
    for _ in range(3):
        if _create(path, run_id):
            return SlideClaim(path, heartbeat_s)
        holder = read_holder(path)
        if holder is None:
            continue  # released between our two looks
        if not is_stale(holder, run_id, stale_after_s):
            return holder
        _take_over(path, holder)
    holder = read_holder(path)
    return holder if holder is not None else ClaimHolder("?", -1, "?", "?", 0.0)


def _try_claim_bucket(path: RemotePath, run_id: str, stale_after_s: float,
                      heartbeat_s: float) -> BucketClaim | ClaimHolder:
    """`try_claim` in a bucket: create on the condition of absence; a stale claim replaced on its version."""
    from ..location.objects import create_exclusive, read_versioned, replace_if_unchanged

    data = _claim_bytes(run_id)
    for _ in range(3):
        tag = create_exclusive(path, data)
        if tag is not None:
            return BucketClaim(path, tag, data, heartbeat_s)
        found = read_versioned(path)
        if found is None:
            continue  # released between our two looks
        holder = _holder(found.data, found.age_s)
        if not is_stale(holder, run_id, stale_after_s):
            return holder
        tag = replace_if_unchanged(path, data, found.tag)
        if tag is not None:
            return BucketClaim(path, tag, data, heartbeat_s)
    holder = read_holder(path)
    return holder if holder is not None else ClaimHolder("?", -1, "?", "?", 0.0)


def release_run_claims(outs: list[Union[Path, RemotePath]], run_id: str) -> None:
    """Remove the claims this run still holds on `outs` (after its workers were stopped)."""
    for out in outs:
        path = claim_path(out)
        if isinstance(path, RemotePath):
            from ..location.objects import delete_if_unchanged, read_versioned

            found = read_versioned(path)
            if found is not None and _holder(found.data, found.age_s).run == run_id:
                delete_if_unchanged(path, found.tag)
            continue
        holder = read_holder(path)
        if holder is not None and holder.run == run_id:
            path.unlink(missing_ok=True)
