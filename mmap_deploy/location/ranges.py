"""Range reads of a remote file through a block cache: what a slide reader gets instead of the whole file.

`open_range` gives a read-only binary file whose reads are ranged GETs of
whole blocks (`BLOCK_BYTES`), kept in an LRU cache of `CACHE_BLOCKS` blocks:
a reader that wants one pyramid level of a slide fetches the blocks holding
that level's tiles and the file's header, never the whole file. It is safe
to read from several threads (`RangeFile.read_at`). Its `stats` count the
requests, bytes and retries (`access.IOStats`).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .access import IOStats, call, fs_path

if TYPE_CHECKING:  # pragma: no cover
    from .url import RemoteURL as RemotePath  # the names are all a storage call needs

BLOCK_BYTES = 1 << 20  # a ranged GET costs a round trip (~20-50 ms on S3): 1 MiB holds many tiles of one band
CACHE_BLOCKS = 64  # per open file: 64 MiB at most


def open_range(loc: RemotePath, *, block_bytes: int = BLOCK_BYTES, cache_blocks: int = CACHE_BLOCKS) -> RangeFile:
    """A read-only binary file over `loc` that fetches blocks by range (see `RangeFile`)."""
    stats = IOStats()
    found = call(loc, "reading its size", lambda fs: fs.info(fs_path(loc)), stats=stats)
    size = found.get("size")
    if found.get("type") == "directory":
        raise UserError(f"{loc}: is a folder, not a file; give the file's own path")
    if size is None:
        raise UserError(f"{loc}: the server does not say the file's size (no Content-Length), so it cannot be read "
                        "by range; copy the file to local disk or serve it from a server that does")
    return RangeFile(loc, int(size), block_bytes=block_bytes, cache_blocks=cache_blocks, stats=stats)


class RangeFile(io.RawIOBase):
    """A remote file read by byte range through an LRU cache of blocks; seekable, read-only, thread-safe.

    `read`/`seek`/`tell` as any binary file (what tifffile, PIL and pyarrow
    take); `read_at(offset, n)` reads without moving the position, for
    readers on several threads. A read needing several missing blocks in a
    row fetches them in one request. `stats` counts this file's requests
    and bytes, the `info` call that found its size included.
    """

    def __init__(self, loc: RemotePath, size: int, *, block_bytes: int = BLOCK_BYTES,
                 cache_blocks: int = CACHE_BLOCKS, stats: IOStats | None = None):
        super().__init__()
        self.location, self.size = loc, size
        self.name = str(loc)  # what readers show in their messages: the display form
        self.stats = stats if stats is not None else IOStats()
        self._block_bytes, self._cache_blocks = int(block_bytes), max(1, int(cache_blocks))
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._pos = 0
        self._http_file: Any = None

    # io.RawIOBase
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int = -1) -> bytes:
        n = self.size - self._pos if size is None or size < 0 else size
        data = self.read_at(self._pos, n)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    # the cache
    def read_at(self, offset: int, n: int) -> bytes:
        """`n` bytes from `offset` (fewer at the end of the file); the position is not moved."""
        if self.closed:
            raise ValueError("I/O operation on closed file")
        end = min(self.size, offset + max(0, n))
        if end <= offset:
            return b""
        bb = self._block_bytes
        first, last = offset // bb, (end - 1) // bb
        got: dict[int, bytes] = {}
        with self._lock:
            for i in range(first, last + 1):
                block = self._blocks.get(i)
                if block is not None:
                    self._blocks.move_to_end(i)
                    got[i] = block
        i = first
        while i <= last:  # each run of missing blocks in one request
            if i in got:
                i += 1
                continue
            j = i
            while j + 1 <= last and j + 1 not in got:
                j += 1
            data = self._fetch(i * bb, min(self.size, (j + 1) * bb))
            for k in range(i, j + 1):
                got[k] = data[(k - i) * bb:(k - i + 1) * bb]
            i = j + 1
        with self._lock:
            for k in range(first, last + 1):
                self._blocks[k] = got[k]
                self._blocks.move_to_end(k)
            while len(self._blocks) > self._cache_blocks:
                self._blocks.popitem(last=False)
        joined = b"".join(got[k] for k in range(first, last + 1))
        return joined[offset - first * bb:end - first * bb]

    def _fetch(self, start: int, end: int) -> bytes:
        loc = self.location

        def fetch(fs: Any) -> bytes:
            if loc.is_bucket:
                return fs.cat_file(fs_path(loc), start=start, end=end)
            return self._http_range(fs, start, end)

        data = call(loc, f"reading bytes {start}-{end - 1}", fetch, stats=self.stats, count_bytes=len)
        if len(data) != end - start:
            raise UserError(f"{loc}: asked for {end - start} bytes at {start}, got {len(data)}: the file changed "
                            "while it was read, or the server does not honour byte ranges; rerun, or copy it locally")
        return data

    def _http_range(self, fs: Any, start: int, end: int) -> bytes:
        # fsspec's HTTPFile checks that the server answered with the range (206), instead of
        # downloading the whole file as a plain ranged cat_file would when the server ignores ranges
        if self._http_file is None:
            self._http_file = fs.open(self.location.url, "rb", block_size=self._block_bytes, cache_type="none",
                                      size=self.size)
        return self._http_file._fetch_range(start, end)

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
        super().close()


