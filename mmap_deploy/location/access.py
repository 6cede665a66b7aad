"""Reading remote locations: the storage clients, failures said in one line, retries, range reads, byte counts.

- **Clients.** fsspec's `s3fs` (S3 and S3-compatible stores), `gcsfs` (GCS)
  and its HTTP file system (aiohttp), from the `[cloud]` extra, imported
  only when a URL is opened. Without them, one line names the extra.
  Credentials come the usual ways: for S3 the environment
  (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL_S3`, ...), the
  profile files or the instance role; for GCS Application Default
  Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, `gcloud auth
  application-default login`, the VM's service account). A read from S3
  that finds no credentials at all is retried anonymously (public buckets
  such as the Imaging Data Commons'), and said once in a note; gcsfs falls
  back to anonymous access by itself. `set_storage_options` gives
  explicit options (keys, an endpoint); their values are secrets, never
  shown (`naming.redact_text`).
- **Failures.** A transient failure (timeout, dropped connection, HTTP 5xx,
  429, S3 SlowDown) is retried `RETRY.tries` times in all, with backoff; then
  one UserError line names the URL and the fix (GCS: gcsfs's own retries,
  not multiplied by ours). Not found, access denied and an unknown bucket
  are said at once. A failed write that cannot succeed
  on a retry (denied, no bucket) is an `OutputStorageError`: a batch stops
  there. The clients' own retry loops are turned off (S3) so that the
  bound is this module's.
- **Range reads**: `ranges.open_range`.
- **Counts.** Every call to a store, every byte fetched, every retry and
  the seconds spent waiting are added to the file's `stats` and to the
  process-wide `io_totals()`: a slide's share is the difference of two
  snapshots (`IOStats.timings()` for `uns['mmap']['timings']`).
"""

from __future__ import annotations

import errno
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from ..errors import OutputStorageError, UserError, first_line
from .naming import CLOUD_EXTRA, SCHEMES, add_secret, redact_text

if TYPE_CHECKING:  # pragma: no cover
    from .url import RemoteURL as RemotePath  # the names are all a storage call needs

_T = TypeVar("_T")

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # no byte for this long: the connection is taken as dropped (and retried)


@dataclass
class RetryPolicy:
    """How often a transient failure is tried again: `tries` in all, waits doubling from `first_wait_s`."""

    tries: int = 4
    first_wait_s: float = 0.5
    max_wait_s: float = 8.0

    def wait(self, attempt: int) -> float:
        """Seconds before try `attempt + 1`; jittered so that many workers do not retry in step."""
        base = min(self.max_wait_s, self.first_wait_s * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)


RETRY = RetryPolicy()

# What went wrong, for the message and for whether to try again
TRANSIENT, NOT_FOUND, NO_BUCKET, DENIED, NO_CREDENTIALS, PRECONDITION, OTHER = (
    "transient", "not found", "no bucket", "denied", "no credentials", "precondition", "other")
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "AllAccessDisabled",
                 "AccountProblem", "InvalidToken", "TokenRefreshRequired", "403", "401"}
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504", "429"}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EBUSY, errno.EREMOTEIO, errno.EHOSTUNREACH, errno.ENETUNREACH}
_TRANSIENT_TYPES = {"ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError", "ClientOSError",
                    "ServerTimeoutError", "ClientConnectorError", "ContentLengthError", "TransferEncodingError",
                    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ResponseStreamingError", "IncompleteReadError", "ProxyError", "ChunkedEncodingError",
                    "FSTimeoutError", "ChecksumError"}


@dataclass
class IOStats:
    """Calls to a store, bytes fetched, retries, and seconds spent in those calls (summed over threads)."""

    requests: int = 0
    bytes: int = 0
    retries: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, requests: int = 0, nbytes: int = 0, retries: int = 0, seconds: float = 0.0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.retries += retries
            self.seconds += seconds

    def snapshot(self) -> IOStats:
        with self._lock:
            return IOStats(self.requests, self.bytes, self.retries, self.seconds)

    def __sub__(self, other: IOStats) -> IOStats:
        return IOStats(self.requests - other.requests, self.bytes - other.bytes, self.retries - other.retries,
                       self.seconds - other.seconds)

    def timings(self, prefix: str = "remote") -> dict[str, float]:
        """As floats for `uns['mmap']['timings']`: `{prefix}_requests`, `_bytes`, `_retries`, `_seconds`."""
        return {f"{prefix}_requests": float(self.requests), f"{prefix}_bytes": float(self.bytes),
                f"{prefix}_retries": float(self.retries), f"{prefix}_seconds": round(float(self.seconds), 4)}


_TOTALS = IOStats()


def _count(stats: IOStats | None, **counts: Any) -> None:
    """Add to a file's stats (when it has some) and to the process's totals."""
    if stats is not None:
        stats.add(**counts)
    _TOTALS.add(**counts)


def io_totals() -> IOStats:
    """A snapshot of this process's remote I/O so far; subtract two to get what happened between them."""
    return _TOTALS.snapshot()


# -- the storage clients -------------------------------------------------------------------------
_FAMILY = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
_options: dict[str, dict[str, Any]] = {}
_clients: dict[tuple[str, bool], Any] = {}
_anonymous: set[tuple[str, str]] = set()  # (family, bucket) read anonymously: no credentials were found
_clients_lock = threading.Lock()


def set_storage_options(scheme: str, **options: Any) -> None:
    """Options for the client of `scheme` (`s3`, `gs`, `http`), e.g. `key`, `secret`, `endpoint_url`, `token`.

    What fsspec's `storage_options` take for s3fs, gcsfs and its HTTP file
    system. Their string values are secrets: never shown in a message or
    written to an output. Most runs need none (see the module docstring).
    """
    family = _FAMILY.get(scheme.lower().removesuffix("://"))
    if family is None:
        raise UserError(f"set_storage_options: unknown scheme {scheme!r}; use s3, gs or http")
    for value in options.values():
        if isinstance(value, str):
            add_secret(value)
    _options[family] = dict(options)
    reset_clients()


def reset_clients() -> None:
    """Forget the clients made so far (new credentials or endpoint in the environment are read anew)."""
    with _clients_lock:
        _clients.clear()
        _anonymous.clear()


def _import_client(loc: RemotePath) -> None:
    package = SCHEMES[loc.scheme]
    for name in ("fsspec", package):
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"{loc}: reading {loc.scheme}:// needs the {name} package, not installed here: "
                            f"{CLOUD_EXTRA}") from None


def client(loc: RemotePath, anonymous: bool = False) -> Any:
    """The fsspec file system for `loc`'s scheme (made once per process; see `reset_clients`)."""
    family = _FAMILY[loc.scheme]
    key = (family, anonymous)
    with _clients_lock:
        fs = _clients.get(key)
    if fs is not None:
        return fs
    _import_client(loc)
    # no listings cache: another process (a worker, another run) writes outputs and claims meanwhile
    options = {"use_listings_cache": False, **_options.get(family, {})}
    # skip_instance_cache: our clients have their own retry settings; another library's stay untouched
    if family == "s3":
        import s3fs

        config = {"retries": {"total_max_attempts": 1, "mode": "standard"}, "connect_timeout": CONNECT_TIMEOUT_S,
                  "read_timeout": READ_TIMEOUT_S, **options.pop("config_kwargs", {})}
        fs = s3fs.S3FileSystem(anon=anonymous or options.pop("anon", False), config_kwargs=config,
                               skip_instance_cache=True, **options)
        fs.retries = 1  # s3fs's own loop: off, the bound is RETRY's
    elif family == "gcs":
        import gcsfs

        token = "anon" if anonymous else options.pop("token", None)
        fs = gcsfs.GCSFileSystem(token=token, skip_instance_cache=True, **options)
    else:
        import aiohttp
        from fsspec.implementations.http import HTTPFileSystem

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        client_kwargs = {"timeout": timeout, **options.pop("client_kwargs", {})}
        fs = HTTPFileSystem(skip_instance_cache=True, client_kwargs=client_kwargs, **options)
    with _clients_lock:
        return _clients.setdefault(key, fs)


def fs_path(loc: RemotePath) -> str:
    """The name the client takes: `bucket/key` for S3 and GCS, the URL for HTTP."""
    return f"{loc.bucket}/{loc.key}" if loc.is_bucket else loc.url


# -- what went wrong ---------------------------------------------------------------------------
def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = 0
    while exc is not None and seen < 6:
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def classify(exc: BaseException) -> str:
    """What kind of failure `exc` is (TRANSIENT, NOT_FOUND, NO_BUCKET, DENIED, NO_CREDENTIALS, PRECONDITION, OTHER)."""
    for e in _chain(exc):
        name = type(e).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return NO_CREDENTIALS
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:  # botocore's ClientError
            code = str(response["Error"].get("Code", ""))
            if code == "NoSuchBucket":
                return NO_BUCKET
            if code in ("NoSuchKey", "404", "NotFound"):
                return NOT_FOUND
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return PRECONDITION
            if code in _DENIED_CODES:
                return DENIED
            if code in _TRANSIENT_CODES:
                return TRANSIENT
        status = getattr(e, "status", None) if name == "ClientResponseError" else getattr(e, "code", None)
        if name in ("ClientResponseError", "HttpError") and isinstance(status, int):
            if status in (401, 403):
                return DENIED
            if status in (404, 410):
                return NOT_FOUND
            if status == 412:
                return PRECONDITION
            if status in _TRANSIENT_STATUS:
                return TRANSIENT
            return OTHER
        if name in _TRANSIENT_TYPES:
            return TRANSIENT
    if isinstance(exc, FileNotFoundError):
        return NO_BUCKET if "bucket does not exist" in str(exc).lower() else NOT_FOUND
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and str(exc).startswith("Forbidden")):
        return DENIED
    if isinstance(exc, FileExistsError):
        return PRECONDITION
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return TRANSIENT
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return TRANSIENT
    return OTHER


def _credentials_hint(loc: RemotePath) -> str:
    if loc.scheme == "s3":
        return ("set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an instance role "
                "gives them")
    if loc.is_bucket:
        return ("run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service "
                "account's key file")
    return "the URL may have expired (a signed URL: sign it anew) or need a token"


def _reason(exc: BaseException) -> str:
    """The failure in a few words: the store's status or code when there is one, else the first line."""
    for e in _chain(exc):
        if type(e).__name__ == "ClientResponseError":
            return f"HTTP {getattr(e, 'status', '?')} {getattr(e, 'message', '')}".strip()
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            err = response["Error"]
            return f"{err.get('Code', '?')}: {err.get('Message', '')}".strip().rstrip(":")
    return first_line(exc, with_type=True)


def storage_error(loc: RemotePath, what: str, exc: BaseException, kind: str, *, tries: int = 1,
                  write: bool = False) -> UserError:
    """The one line for a failed `what` (e.g. "reading it") on `loc`; an OutputStorageError when a write cannot
    succeed on a retry."""
    reason = redact_text(_reason(exc))
    where = "bucket and key" if loc.is_bucket else "URL"
    if kind == NOT_FOUND:
        msg = f"{loc}: not found; check the {where}"
    elif kind == NO_BUCKET:
        msg = (f"{loc}: the bucket {loc.bucket!r} does not exist (or not at this endpoint); check the bucket's name"
               + (" or create the bucket" if write else ""))
    elif kind == DENIED:
        msg = (f"{loc}: access denied {what} ({reason}); {_credentials_hint(loc)}, and check that they may "
               f"{'write there' if write else 'read it'}")
    elif kind == NO_CREDENTIALS:
        msg = f"{loc}: no credentials found for {loc.scheme}:// ({what}); {_credentials_hint(loc)}"
    elif kind == TRANSIENT:
        times = f" {tries} times" if tries > 1 else ""
        msg = (f"{loc}: {what} failed{times} ({reason}); the connection or the service failed: check the "
               "network (or the endpoint) and rerun" + (" (finished slides are skipped)" if write else ""))
    else:
        msg = f"{loc}: failed {what} ({reason})"
    cls = OutputStorageError if write and kind in (DENIED, NO_BUCKET, NO_CREDENTIALS) else UserError
    err = cls(msg)
    err.kind = kind  # type: ignore[attr-defined]
    return err


def _is_ours(exc: BaseException) -> bool:
    """Whether `exc` is a storage failure to report in one line (else it is a bug, and keeps its traceback)."""
    if isinstance(exc, (OSError, ValueError)):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("aiohttp", "botocore", "aiobotocore", "gcsfs", "google", "fsspec", "requests")


def call(loc: RemotePath, what: str, fn: Callable[[Any], _T], *, stats: IOStats | None = None, write: bool = False,
         count_bytes: Callable[[_T], int] | None = None, passthrough: tuple[str, ...] = ()) -> _T:
    """`fn(client)` with the retries and the one-line failures of the module docstring; counted in `stats`.

    `passthrough`: kinds of failure re-raised as they are (a conditional
    write's PRECONDITION is an answer, not a failure).
    """
    anonymous = not write and (_FAMILY[loc.scheme], loc.bucket) in _anonymous  # writes are never anonymous
    attempt = 0
    while True:
        attempt += 1
        fs = client(loc, anonymous)
        t = time.perf_counter()
        try:
            result = fn(fs)
        except Exception as e:
            seconds = time.perf_counter() - t
            _count(stats, requests=1, seconds=seconds)
            if isinstance(e, UserError) or not _is_ours(e):
                raise
            kind = classify(e)
            if kind in passthrough:
                raise
            if kind == NO_CREDENTIALS and not write and not anonymous and loc.scheme == "s3":
                from ..messages import note

                anonymous = True
                _anonymous.add((_FAMILY[loc.scheme], loc.bucket))
                note(f"no AWS credentials found: reading s3://{loc.bucket} anonymously (a public bucket)")
                attempt -= 1
                continue
            # gcsfs retries transient failures itself (6 tries, backoff): ours would multiply them
            if kind == TRANSIENT and attempt < (1 if _FAMILY[loc.scheme] == "gcs" else RETRY.tries):
                _count(stats, retries=1)
                time.sleep(RETRY.wait(attempt))
                continue
            raise storage_error(loc, what, e, kind, tries=attempt, write=write) from None
        seconds = time.perf_counter() - t
        nbytes = count_bytes(result) if count_bytes is not None else 0
        _count(stats, requests=1, nbytes=nbytes, seconds=seconds)
        return result


def call_or(loc: RemotePath, what: str, fn: Callable[[Any], _T], answers: dict[str, Any], **kwargs: Any) -> Any:
    """`call`, with a failure of a kind in `answers` turned into its value (e.g. `{NOT_FOUND: None}`)."""
    try:
        return call(loc, what, fn, passthrough=tuple(answers), **kwargs)
    except UserError:
        raise
    except Exception as e:
        kind = classify(e)
        if kind in answers:
            return answers[kind]
        raise


# -- what is there -------------------------------------------------------------------------------
@dataclass
class RemoteStat:
    """What `RemotePath.stat()` gives: the size and the modification time (seconds since the epoch, 0 if unknown)."""

    st_size: int
    st_mtime: float
    kind: str  # "file" or "directory"
    tag: str = ""  # ETag (S3, HTTP) or generation (GCS)


def _mtime(info: dict[str, Any]) -> float:
    import datetime as dt

    value = info.get("LastModified") or info.get("updated") or info.get("mtime") or info.get("Last-Modified")
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, str):
        from email.utils import parsedate_to_datetime

        for parse in (lambda v: dt.datetime.fromisoformat(v.replace("Z", "+00:00")), parsedate_to_datetime):
            try:
                return parse(value).timestamp()
            except (ValueError, TypeError):
                pass
    return 0.0


def info(loc: RemotePath, what: str = "looking it up") -> RemoteStat | None:
    """The object's size, time and kind; None when nothing is there."""
    if not loc.key and loc.is_bucket:  # the bucket itself
        return None if bucket_exists(loc) is False else RemoteStat(0, 0.0, "directory")
    if not loc.is_bucket and loc.url.split("?")[0].endswith("/"):
        return RemoteStat(0, 0.0, "directory")  # HTTP has no folders to ask about: a URL ending in / names one
    d = call_or(loc, what, lambda fs: fs.info(fs_path(loc)), {NOT_FOUND: None})
    if d is None:
        return None
    kind = "directory" if d.get("type") == "directory" else "file"
    tag = str(d.get("ETag") or d.get("generation") or "")
    return RemoteStat(int(d.get("size") or 0), _mtime(d), kind, tag)


def bucket_exists(loc: RemotePath) -> bool | None:
    """Whether `loc`'s bucket exists; None when these credentials may not look (403: no answer)."""

    def ask(fs: Any) -> Any:
        if loc.scheme == "s3":
            return fs.call_s3("head_bucket", Bucket=loc.bucket)
        return fs.call("GET", "b/{}", loc.bucket, json_out=True)

    answer = call_or(loc, "finding the bucket", ask, {NOT_FOUND: "absent", NO_BUCKET: "absent", DENIED: "unknown"})
    return False if answer == "absent" else None if answer == "unknown" else True


def exists(loc: RemotePath) -> bool:
    return info(loc) is not None


def is_file(loc: RemotePath) -> bool:
    found = info(loc)
    return found is not None and found.kind == "file"


def is_dir(loc: RemotePath) -> bool:
    found = info(loc)
    return found is not None and found.kind == "directory"


def stat(loc: RemotePath) -> RemoteStat:
    found = info(loc, "reading its size")
    if found is None:
        raise storage_error(loc, "reading its size", FileNotFoundError(str(loc)), NOT_FOUND)
    return found


def list_folder(loc: RemotePath) -> list[RemotePath]:
    """The objects and folders directly under `loc` (S3, GCS); over HTTP a UserError: it has no listing."""
    if not loc.is_bucket:
        raise UserError(f"{loc}: a folder over HTTP cannot be listed; give the file's own URL")
    entries = call(loc, "listing it", lambda fs: fs.ls(fs_path(loc).rstrip("/"), detail=True, refresh=True))
    out = []
    for e in entries:
        name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        if name:
            out.append(loc / (name + ("/" if e.get("type") == "directory" else "")))
    return out


def read_bytes(loc: RemotePath, what: str = "reading it") -> bytes:
    """The whole object (a table, a JSON file, a small image): one GET, retried, counted."""
    return call(loc, what, lambda fs: fs.cat_file(fs_path(loc)), count_bytes=len)
