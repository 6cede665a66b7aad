"""Real servers on 127.0.0.1 for the remote-storage tests, each started and stopped by its test's fixture.

- `FileServer`: an HTTP/1.1 server of in-memory files with byte ranges (206),
  HEAD, forced status codes, and connections dropped mid-body when the test
  says so (`drop(path, times)`): a count the test sets before the read, so
  nothing races the clock.
- `S3`: moto's S3 server (`ThreadedMotoServer`) on a free port, with a
  fresh bucket per test and the environment a client needs to find it.
- `FaultProxy`: a reverse proxy in front of the S3 server that drops the
  connection of the requests a test names (e.g. every upload of a part),
  after reading their bodies: an upload that fails mid-way, for real.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _serve(handler: type, state) -> tuple[_Server, threading.Thread]:
    server = _Server(("127.0.0.1", 0), handler)
    server.state = state
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def _stop(server: _Server, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=30)


class _FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool) -> None:
        st: FileServer = self.server.state
        path = urlsplit(self.path).path
        with st.lock:
            st.hits[(self.command, path)] += 1
            st.requests.append((self.command, self.path, self.headers.get("Range")))
            status = st.status.get(path)
            drop = body and st.drops.get(path, 0) != 0
            if drop and st.drops[path] > 0:
                st.drops[path] -= 1
        if status is not None:
            return self._empty(status)
        data = st.files.get(path)
        if data is None:
            return self._empty(404)
        start, end, code = 0, len(data), 200
        m = _RANGE.match(self.headers.get("Range", "") or "")
        if m and st.ranges:
            start = int(m.group(1))
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            if start >= len(data):
                return self._empty(416)
            code = 206
        self.send_response(code)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes" if st.ranges else "none")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if drop:  # half the promised body, then the connection goes
            self.wfile.write(data[start:start + (end - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data[start:end])


class FileServer:
    """In-memory files over HTTP on 127.0.0.1 (a context manager); `url(path)` is a file's URL."""

    def __init__(self, files: dict[str, bytes] | None = None, ranges: bool = True):
        self.files = dict(files or {})
        self.status: dict[str, int] = {}
        self.drops: dict[str, int] = {}
        self.hits: Counter = Counter()
        self.requests: list[tuple[str, str, str | None]] = []
        self.ranges = ranges
        self.lock = threading.Lock()

    def __enter__(self) -> FileServer:
        self._server, self._thread = _serve(_FileHandler, self)
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        _stop(self._server, self._thread)

    def url(self, path: str) -> str:
        return self.base + path

    def drop(self, path: str, times: int = 1) -> None:
        """Drop the next `times` GETs of `path` half-way through their body (-1: every one)."""
        with self.lock:
            self.drops[path] = times

    def gets(self, path: str) -> int:
        return self.hits[("GET", path)]


class S3:
    """moto's S3 server on a free port of 127.0.0.1 (a context manager)."""

    def __enter__(self) -> S3:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()

    @staticmethod
    def environment(endpoint: str) -> dict[str, str]:
        """What an S3 client needs to find this server (credentials moto accepts)."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
                "AWS_ENDPOINT_URL": endpoint}


def new_bucket_name() -> str:
    return f"mmap-{uuid.uuid4().hex[:12]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(out)
                out.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self) -> None:
        st: FaultProxy = self.server.state
        body = self._body()
        with st.lock:
            st.seen.append((self.command, self.path))
            drop = st.should_drop(self.command, self.path)
            if drop:
                st.dropped.append((self.command, self.path))
        if drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("transfer-encoding", "connection", "expect", "content-length")}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", st.target_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            self.send_response(r.status, r.reason)
            for k, v in r.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class FaultProxy:
    """A reverse proxy to `target_port` that drops the requests `should_drop(method, path)` names."""

    def __init__(self, target_port: int, should_drop: Callable[[str, str], bool]):
        self.target_port, self.should_drop = target_port, should_drop
        self.seen: list[tuple[str, str]] = []
        self.dropped: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __enter__(self) -> FaultProxy:
        self._server, self._thread = _serve(_ProxyHandler, self)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        _stop(self._server, self._thread)


# -- pytest fixtures (imported by the test modules that use them) --------------------------------
import pytest  # noqa: E402


class Bucket:
    """A fresh bucket on the S3 server, and direct access to its objects for the assertions."""

    def __init__(self, name: str, endpoint: str):
        from mmap_deploy.location import RemotePath
        from mmap_deploy.location.access import client

        self.name, self.endpoint = name, endpoint
        self.fs = client(RemotePath(f"s3://{name}/"))

    def url(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> str:
        self.fs.pipe_file(f"{self.name}/{key}", data)
        return self.url(key)

    def put_folder(self, local, prefix: str) -> str:
        for p in sorted(local.rglob("*")):
            if p.is_file():
                self.put(f"{prefix}/{p.relative_to(local).as_posix()}", p.read_bytes())
        return self.url(prefix + "/")

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(f"{self.name}/{key}")

    def keys(self) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(k.split("/", 1)[1] for k in self.fs.find(self.name))

    def pending_uploads(self) -> list:
        return self.fs.call_s3("list_multipart_uploads", Bucket=self.name).get("Uploads", [])


@pytest.fixture(scope="module")
def s3_server():
    with S3() as server:
        yield server


def point_clients_at(monkeypatch, endpoint: str) -> None:
    """The environment of an S3 client that talks to `endpoint`; clients made anew."""
    from mmap_deploy.location import reset_clients

    for k, v in S3.environment(endpoint).items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(k, raising=False)
    reset_clients()


@pytest.fixture
def fast_retries(monkeypatch):
    """Three tries without waiting: the tests count tries, they do not wait for backoff."""
    from mmap_deploy.location import access

    monkeypatch.setattr(access, "RETRY", access.RetryPolicy(tries=3, first_wait_s=0.0))


@pytest.fixture
def bucket(s3_server, monkeypatch, fast_retries):
    from mmap_deploy.location import RemotePath, reset_clients
    from mmap_deploy.location.access import client

    point_clients_at(monkeypatch, s3_server.endpoint)
    name = new_bucket_name()
    client(RemotePath(f"s3://{name}/")).mkdir(name)
    yield Bucket(name, s3_server.endpoint)
    reset_clients()


@pytest.fixture
def web():
    with FileServer() as server:
        yield server
