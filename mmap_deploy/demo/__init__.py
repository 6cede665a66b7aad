"""Demo data shipped with the package: a small her2st sample and a demo bundle."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


def sample_paths() -> tuple[Path, Path, float]:
    """The demo sample: (image path, coordinates path, mpp in µm per pixel).

    A crop of her2st section B4 (Andersson et al., Nature Communications 2021,
    CC-BY 4.0) with its spots as a her2st `*_selection.tsv`; see README.md in
    this folder. The mpp is also in the image's EXIF tags, so `open_slide`
    finds it without `--mpp`.
    """
    from ..errors import UserError

    info_path = SAMPLE_DIR / "sample.json"
    try:
        info = json.loads(info_path.read_text())
        image, coords, mpp = SAMPLE_DIR / info["image"], SAMPLE_DIR / info["coords"], float(info["mpp"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{info_path}: the demo sample is missing or damaged ({exc}); reinstall mmap-deploy, or regenerate it "
            "with `python -m mmap_deploy.demo.make_sample --data-dir DATA`"
        ) from None
    for p in (image, coords):
        if not p.is_file():
            raise UserError(
                f"{p}: demo sample file missing; regenerate it with "
                "`python -m mmap_deploy.demo.make_sample --data-dir DATA`"
            )
    return image, coords, mpp
