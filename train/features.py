"""The phase-1 feature cache: `f` and `y1` of every spot of every section, on disk.

Layout (the one of the published features in `mmap_features/`), per section:
`{section}_f.npy` (n, D) float32, `{section}_y1.npy` (n, G) float32,
`{section}_spots.txt` (the n spot ids, one a line). The published
`{section}_clss.npy` / `{section}_outs.npy` names are read too.

`cache.json` names the backbone that made the cache (`{"backbone": "uni",
"embed_dim": 1024, "checkpoint": "checkpoint.pt"}`), so that phase 2 builds its
model on that backbone. A cache without it (made before mmap-train wrote it,
or the published features) is taken to come from the backbone of its width,
said in a warning: a guess that fails once two backbones share a width.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmap_deploy.atomic import atomic_path
from mmap_deploy.errors import UserError
from mmap_deploy.messages import progress, warn

log = logging.getLogger(__name__)

CACHE_INFO = "cache.json"
_F_NAMES = ("_f.npy", "_clss.npy")
_Y1_NAMES = ("_y1.npy", "_outs.npy")


@dataclass
class SectionFeatures:
    """Phase-1 outputs of one section's spots."""

    section: str
    spot_ids: list[str]
    f: np.ndarray  # (n, D) float32
    y1: np.ndarray  # (n, G) float32


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def write_section(cache_dir: str | Path, feats: SectionFeatures) -> None:
    """Write one section into the cache (each file atomically; spots last, marking it complete)."""
    d = Path(cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    if not (len(feats.spot_ids) == len(feats.f) == len(feats.y1)):
        raise ValueError("spot ids, f and y1 must have one row per spot")
    _save_npy(d / f"{feats.section}_f.npy", np.ascontiguousarray(feats.f, dtype=np.float32))
    _save_npy(d / f"{feats.section}_y1.npy", np.ascontiguousarray(feats.y1, dtype=np.float32))
    with atomic_path(d / f"{feats.section}_spots.txt") as tmp:
        tmp.write_text("".join(f"{s}\n" for s in feats.spot_ids))


def write_cache_info(cache_dir: str | Path, backbone: str, embed_dim: int, checkpoint: str | Path) -> None:
    """Name the backbone (and the checkpoint) that makes the cache's features; UserError when the cache
    already holds another backbone's."""
    d = Path(cache_dir)
    had = _read_cache_info(d)
    if had is not None and had.get("backbone") != backbone:
        raise UserError(f"{d}: this feature cache holds features of the {had.get('backbone')} backbone, "
                        f"{checkpoint} is a {backbone} model; write its features to another --out folder")
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / CACHE_INFO) as tmp:
        tmp.write_text(json.dumps({"backbone": backbone, "embed_dim": int(embed_dim),
                                   "checkpoint": Path(checkpoint).name}, indent=1) + "\n")


def _read_cache_info(d: Path) -> dict | None:
    path = d / CACHE_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({e}); rebuild the cache with `mmap-train features`") from None
    if not isinstance(info, dict) or not isinstance(info.get("backbone"), str):
        raise UserError(f"{path}: no backbone name in it; rebuild the cache with `mmap-train features`")
    return info


def cache_backbone(cache_dir: str | Path, embed_dim: int, fallback: str | None = None) -> str:
    """The backbone whose features the cache holds (`embed_dim` wide): the name the cache records.

    A cache that records none (older caches, the published features) is
    taken as `fallback` when given (the `--init` checkpoint's backbone), else
    as the one backbone of that width, said in a warning; UserError when no
    backbone, or more than one, has that width.
    """
    from .backbones import BACKBONES, backbones_of_width, get_backbone

    d = Path(cache_dir)
    info = _read_cache_info(d)
    if info is not None:
        backbone = get_backbone(info["backbone"])
        if backbone.embed_dim != embed_dim:
            raise UserError(f"{d / CACHE_INFO}: names the {backbone.name} backbone ({backbone.embed_dim} wide) but "
                            f"the cached features are {embed_dim} wide; rebuild the cache with `mmap-train features`")
        return backbone.name
    if fallback is not None:
        return fallback
    fits = backbones_of_width(embed_dim)
    if not fits:
        raise UserError(f"{d}: cached features are {embed_dim}-wide; known backbones give "
                        f"{', '.join(f'{b.embed_dim} ({b.name})' for b in BACKBONES.values())}")
    if len(fits) > 1:
        raise UserError(f"{d}: the cache does not name its backbone and {embed_dim}-wide features fit "
                        f"{' and '.join(b.name for b in fits)}; rebuild it with `mmap-train features` "
                        "(which names it), or pass the phase-1 checkpoint that made it as --init")
    warn(f"{d}: the feature cache does not name its backbone (made before mmap-train recorded it, or the "
         f"published features); taken as {fits[0].name}, the backbone of {embed_dim}-wide features")
    return fits[0].name


def cached_sections(cache_dir: str | Path) -> list[str]:
    """Names of the sections present in a cache directory (those with a spots file), sorted."""
    d = Path(cache_dir)
    if not d.is_dir():
        raise UserError(f"{d}: feature cache directory not found; make one with `mmap-train features`")
    return sorted(p.name[: -len("_spots.txt")] for p in d.glob("*_spots.txt"))


def _first(d: Path, section: str, suffixes: tuple[str, ...], what: str) -> Path:
    for suf in suffixes:
        p = d / f"{section}{suf}"
        if p.is_file():
            return p
    raise UserError(f"{d}: section {section} has a spots file but no {what} file "
                    f"({' or '.join(section + s for s in suffixes)}); rebuild the cache")


def read_section(cache_dir: str | Path, section: str) -> SectionFeatures:
    """Read one section from a cache, checking that the three files agree."""
    d = Path(cache_dir)
    spots_path = d / f"{section}_spots.txt"
    if not spots_path.is_file():
        raise UserError(f"{d}: no {section}_spots.txt; the cache has {', '.join(cached_sections(d)) or 'no sections'}")
    ids = [s.strip() for s in spots_path.read_text().splitlines() if s.strip()]
    f_path = _first(d, section, _F_NAMES, "f")
    y1_path = _first(d, section, _Y1_NAMES, "y1")
    f = np.load(f_path).astype(np.float32, copy=False)
    y1 = np.load(y1_path).astype(np.float32, copy=False)
    if f.ndim != 2 or y1.ndim != 2 or not len(ids) == len(f) == len(y1):
        raise UserError(f"{d}: section {section} has {len(ids)} spot ids, f of shape {f.shape} and "
                        f"y1 of shape {y1.shape}; they must have one row per spot")
    if len(ids) and not (np.isfinite(f).all() and np.isfinite(y1).all()):
        raise UserError(f"{f_path}: non-finite values in the cached features; rebuild the cache")
    return SectionFeatures(section, ids, f, y1)


def read_cache(cache_dir: str | Path, sections: list[str] | None = None) -> dict[str, SectionFeatures]:
    """Read all (or the named) sections of a cache; UserError for a name the cache lacks."""
    have = cached_sections(cache_dir)
    if not have:
        raise UserError(f"{cache_dir}: no *_spots.txt files; this is not a feature cache")
    names = have if not sections else sections
    missing = [s for s in names if s not in have]
    if missing:
        raise UserError(f"{cache_dir}: section(s) {', '.join(missing)} not in the cache (it has {', '.join(have)})")
    return {s: read_section(cache_dir, s) for s in names}


def compute_features(checkpoint: str | Path, sections: list, out_dir: str | Path, *,
                     batch_size: int = 32, overwrite: bool = False) -> list[str]:
    """Run a phase-1 checkpoint's encoder over every spot of every section and write the cache.

    Spots are those the runtime's coords reader returns (as at run time);
    views are the deterministic centre crops. Sections already in `out_dir`
    are skipped unless `overwrite`. Returns the sections written.
    """
    import torch

    from mmap_deploy.model.preprocess import normalise

    from .model import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    model.eval()
    spec = model.config.view_spec

    def encode(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            f, y1, _ = model.encoder(torch.from_numpy(normalise(views, spec)))
        return f.numpy(), y1.numpy()

    write_cache_info(out_dir, model.config.backbone, model.embed_dim, checkpoint)
    return _encode_sections(encode, spec, (model.embed_dim, model.config.n_genes), sections, out_dir,
                            batch_size=batch_size, overwrite=overwrite)


def compute_features_from_bundle(bundle_dir: str | Path, sections: list, out_dir: str | Path, *,
                                 batch_size: int = 32, overwrite: bool = False) -> list[str]:
    """`compute_features` with a bundle's fp32 `encoder.onnx` (ONNX Runtime, CPU): the `f` the runtime computes.

    For a bundle whose checkpoint is gone (the shipped demo): its training
    spots' embeddings, for its familiarity summary.
    """
    from mmap_deploy.engines import OnnxRuntimeRunner
    from mmap_deploy.model.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    write_cache_info(out_dir, m.backbone, m.embed_dim, Path(bundle_dir) / "encoder.onnx")
    with OnnxRuntimeRunner(bundle.path_of(bundle.select("encoder")), ["CPUExecutionProvider"]) as runner:
        def encode(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            out = runner.infer({"views": views})
            return out["f"], out["y1"]

        return _encode_sections(encode, m.view, (m.embed_dim, len(m.genes)), sections, out_dir,
                                batch_size=batch_size, overwrite=overwrite)


def _encode_sections(encode, spec, dims: tuple[int, int], sections: list, out_dir: str | Path, *,
                     batch_size: int, overwrite: bool) -> list[str]:
    """Every spot of every section through `encode(uint8 views) -> (f, y1)`, written to the cache."""
    from threadpoolctl import threadpool_limits

    from mmap_deploy.model.preprocess import make_views

    from .datasets import read_section_patches, section_spots

    done = set(cached_sections(out_dir)) if Path(out_dir).is_dir() else set()
    written = []
    # views are many small numpy matmuls: BLAS threads only fight the encoder's for the cores
    with threadpool_limits(limits=1, user_api="blas"), progress(len(sections), "feature cache", unit="section") as bar:
        for sec in sections:
            if sec.name in done and not overwrite:
                log.info("%s: already in %s, skipped", sec.name, out_dir)
                bar.update(1)
                continue
            spots = section_spots(sec)
            patches = read_section_patches(sec, np.asarray(spots.xy, np.float64), spec)
            fs, ys = [], []
            for i in range(0, len(patches), batch_size):
                f, y1 = encode(np.stack([make_views(p, spec) for p in patches[i:i + batch_size]]))
                fs.append(f)
                ys.append(y1)
            write_section(out_dir, SectionFeatures(
                sec.name, list(spots.ids),
                np.concatenate(fs) if fs else np.zeros((0, dims[0]), np.float32),
                np.concatenate(ys) if ys else np.zeros((0, dims[1]), np.float32)))
            written.append(sec.name)
            bar.update(1)
    return written
