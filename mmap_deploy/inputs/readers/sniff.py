"""What kind of file a slide is, from its first bytes: what `open_slide` ranks the readers by.

TIFF files are told apart by their first IFD (classic or BigTIFF, either byte
order): an OME-XML description, SubIFDs (a pyramid OpenSlide does not see),
tiles, more pages. Read here without tifffile, so that the choice is the same
whether or not the `[tiff]` extra is installed, and a slide that needs it can
say so.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

# Tags read from the first IFD.
WIDTH, HEIGHT, DESCRIPTION, TILE_WIDTH, SUBIFDS = 256, 257, 270, 322, 330
# Bytes of the ImageDescription looked at: an OME-XML names its namespace in its first element.
DESCRIPTION_BYTES = 4096
# More entries than this in one IFD: not a TIFF (real ones hold a few dozen).
MAX_ENTRIES = 4096
_INTS = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}  # SHORT, LONG, IFD, LONG8, IFD8


@dataclass(frozen=True)
class TiffHeader:
    """The first IFD of a TIFF, what the reader choice needs of it."""

    byteorder: str  # "<" little-endian, ">" big-endian
    bigtiff: bool
    width: int
    height: int
    tiled: bool
    subifds: bool
    more_pages: bool
    ome: bool

    def describe(self) -> str:
        """e.g. "big-endian BigTIFF, tiled, 3 pages or more"."""
        parts = ["big-endian" if self.byteorder == ">" else "little-endian", "BigTIFF" if self.bigtiff else "TIFF",
                 "tiled" if self.tiled else "in strips"]
        if self.subifds:
            parts.append("a pyramid in SubIFDs")
        if self.more_pages:
            parts.append("several pages")
        return ", ".join(parts)


def file_kind(f: BinaryIO) -> str:
    """"tiff", "dicom" or "other", from the first bytes of an open binary file (left at offset 0)."""
    f.seek(0)
    head = f.read(132)
    f.seek(0)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) == 132 and head[128:] == b"DICM":
        return "dicom"
    return "other"


def tiff_header(f: BinaryIO) -> TiffHeader | None:
    """The first IFD of the TIFF `f`; None when it cannot be read (truncated or damaged)."""
    try:
        return _read_header(f)
    except (struct.error, ValueError, OSError, OverflowError):
        return None
    finally:
        f.seek(0)


def _read_header(f: BinaryIO) -> TiffHeader | None:
    f.seek(0)
    head = f.read(16)
    bo = "<" if head[:2] == b"II" else ">"
    version = struct.unpack(bo + "H", head[2:4])[0]
    big = version == 43
    ifd = struct.unpack(bo + "Q", head[8:16])[0] if big else struct.unpack(bo + "I", head[4:8])[0]
    count_fmt, entry_size, inline, next_fmt = ("Q", 20, 8, "Q") if big else ("H", 12, 4, "I")
    f.seek(ifd)
    (n,) = struct.unpack(bo + count_fmt, _exactly(f, struct.calcsize(count_fmt)))
    if not 0 < n <= MAX_ENTRIES:
        return None
    entries = _exactly(f, n * entry_size)
    (next_ifd,) = struct.unpack(bo + next_fmt, _exactly(f, struct.calcsize(next_fmt)))
    tags: dict[int, tuple[int, int, bytes]] = {}
    for i in range(n):
        e = entries[i * entry_size : (i + 1) * entry_size]
        tag, typ = struct.unpack(bo + "HH", e[:4])
        count = struct.unpack(bo + ("Q" if big else "I"), e[4 : 4 + inline])[0]
        tags[tag] = (typ, count, e[4 + inline :])

    def integer(tag: int) -> int:
        typ, _, value = tags.get(tag, (0, 0, b""))
        fmt = _INTS.get(typ)
        return struct.unpack(bo + fmt, value[: struct.calcsize(fmt)])[0] if fmt else 0

    description = b""
    if DESCRIPTION in tags:
        _, count, value = tags[DESCRIPTION]
        size = min(count, DESCRIPTION_BYTES)
        if count <= inline:
            description = value[:size]
        else:
            f.seek(struct.unpack(bo + ("Q" if big else "I"), value)[0])
            description = f.read(size)
    ome = b"<OME" in description and b"openmicroscopy.org" in description
    return TiffHeader(bo, big, integer(WIDTH), integer(HEIGHT), TILE_WIDTH in tags, SUBIFDS in tags, next_ifd != 0,
                      ome)


def _exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated")
    return data
