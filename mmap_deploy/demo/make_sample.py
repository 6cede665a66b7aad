"""Regenerate the demo sample: a crop of her2st section B4 with its spots.

    python -m mmap_deploy.demo.make_sample --data-dir ../shared/data

Writes into `mmap_deploy/demo/sample/` (or `--out`):

- `B4_crop.jpg`: the crop of the full-resolution H&E image, JPEG quality 90,
  with its resolution (µm per pixel) in the EXIF XResolution/ResolutionUnit
  tags, so that `open_slide` finds it without `--mpp`;
- `B4_crop_selection.tsv`: the section's her2st spot table, restricted to
  spots whose whole patch lies inside the crop, `pixel_x`/`pixel_y` shifted to
  the crop's pixels; every other column (and so the `"{x}x{y}"` spot ids) kept;
- `sample.json`: file names, mpp, crop window, source and licence.

Data: Andersson et al., "Spatial deconvolution of HER2-positive breast cancer
delineates tumor-associated cell type interactions", Nature Communications 12
(2021); CC-BY 4.0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SECTION = "B4"
# (left, top, width, height) in the full image: ~120 spots, < 3 MB as JPEG.
CROP = (1200, 4450, 3300, 3300)
SPOT_PITCH_UM = 200.0
JPEG_QUALITY = 90
CITATION = (
    "Andersson et al., \"Spatial deconvolution of HER2-positive breast cancer delineates "
    "tumor-associated cell type interactions\", Nature Communications 12 (2021)"
)
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


def _fmt(v: float) -> str:
    """A pixel coordinate as the source writes it: at most 3 decimals, no trailing zeros."""
    s = f"{v:.3f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def section_mpp(spots_path: Path) -> tuple[float, int]:
    """The whole section's µm per pixel from its spot lattice, to 4 decimals, and the spots fitted.

    The rule `mmap-predict` applies to a slide without a resolution of its own
    (`geometry.fit_lattice`); the whole section's lattice, not the crop's, pins it best.
    """
    from mmap_deploy.inputs.geometry import fit_lattice
    from mmap_deploy.inputs.layouts import read_spot_input

    si = read_spot_input(spots_path)
    fit = fit_lattice(si.spots.xy, si.spots.array_xy, si.lattice)
    return round(fit.mpp, 4), fit.n_spots


def make_sample(data_dir: Path, out: Path = SAMPLE_DIR) -> dict:
    """Write the demo image, spot table and sample.json into `out`; return the sample.json content."""
    from fractions import Fraction

    from PIL import Image, TiffImagePlugin

    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.model.preprocess import DEFAULT_PATCH_UM

    image_path = data_dir / "her2st" / "images" / f"{SECTION}.jpg"
    spots_path = data_dir / "her2st" / "spots" / f"{SECTION}_selection.tsv"
    for p in (image_path, spots_path):
        if not p.is_file():
            raise SystemExit(f"{p}: not found; pass --data-dir, the folder holding her2st/")
    left, top, width, height = CROP
    mpp, n_fitted = section_mpp(spots_path)
    margin = int(np.ceil(DEFAULT_PATCH_UM / mpp / 2))

    lines = spots_path.read_text().splitlines()
    header = lines[0].split("\t")
    ipx, ipy, isel = header.index("pixel_x"), header.index("pixel_y"), header.index("selected")
    kept = [lines[0]]
    for line in lines[1:]:
        f = line.split("\t")
        x, y = float(f[ipx]) - left, float(f[ipy]) - top
        inside = margin <= x < width - margin and margin <= y < height - margin
        if inside and f[isel] == "1":
            f[ipx], f[ipy] = _fmt(x), _fmt(y)
            kept.append("\t".join(f))

    out.mkdir(parents=True, exist_ok=True)
    coords_name = f"{SECTION}_crop_selection.tsv"
    image_name = f"{SECTION}_crop.jpg"
    (out / coords_name).write_text("\n".join(kept) + "\n")

    saved_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # a her2st image is just above PIL's bomb guard
    try:
        with Image.open(image_path) as im:
            crop = im.crop((left, top, left + width, top + height)).convert("RGB")
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit
    exif = Image.Exif()
    # Pixels per centimetre as an exact rational: 1e4 / 0.6876 = 25 000 000 / 1 719.
    ppcm = Fraction(10_000) / Fraction(str(mpp))
    exif[282] = exif[283] = TiffImagePlugin.IFDRational(ppcm.numerator, ppcm.denominator)
    exif[296] = 3  # ResolutionUnit: centimetre
    exif[270] = f"her2st section {SECTION}, crop {CROP}; {CITATION}; CC-BY 4.0"
    crop.save(out / image_name, "JPEG", quality=JPEG_QUALITY, optimize=True, exif=exif)

    spots = read_coords(out / coords_name)
    info = {
        "image": image_name,
        "coords": coords_name,
        "mpp": mpp,
        "mpp_note": (
            f"section {SECTION}'s spot lattice ({SPOT_PITCH_UM:g} µm pitch): least-squares fit of pixel "
            f"position on array index over its {n_fitted} spots, as mmap-predict fits it"
        ),
        "section": SECTION,
        "crop": {"left": left, "top": top, "width": width, "height": height},
        "n_spots": len(spots),
        "source": "her2st (github.com/almaan/her2st)",
        "citation": CITATION,
        "license": "CC-BY 4.0",
    }
    (out / "sample.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding her2st/ (e.g. ../shared/data)")
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR, help="output folder (default: the package's demo/sample)")
    args = parser.parse_args(argv)
    info = make_sample(args.data_dir, args.out)
    size = (args.out / info["image"]).stat().st_size
    print(
        f"wrote {args.out}: {info['image']} ({size / 1e6:.2f} MB), {info['coords']} ({info['n_spots']} spots), sample.json",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
