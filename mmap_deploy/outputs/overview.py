"""The overview picture (`--overview`): the slide's thumbnail, the tissue outline and every spot.

One look tells whether the run predicted where the tissue is: the outline the
tissue detection (or the user's mask) found, and each spot at its true size,
coloured by the tissue piece it sits on; a red ring marks a spot that fails the
image QC (`obs['qc_pass']`), an amber cross one of low familiarity
(`obs['mmap_familiarity']` under `uns['mmap']['qc']['familiarity']['unfamiliar_below']`,
when the run has them). Drawn from the AnnData alone (its
`uns['spatial']` thumbnail and scale factors, `obsm['spatial']`, and the
outline in `uns['mmap']['tissue_outline']`), so it can be redrawn from any
output file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_path
from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import anndata

MAX_SIDE = 1400  # figure pixels on the longest side
OUTLINE_COLOUR = "#00c8ff"  # cyan: visible on pink, purple and white
QC_FAIL_COLOUR = "#ff1a1a"  # red rings: spots failing the image QC
LOW_FAMILIARITY_COLOUR = "#ffb000"  # amber crosses: spots far from the training data


def require_matplotlib(flag: str = "--overview") -> None:
    """A one-line error, before any work, when matplotlib (the [plot] extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"{flag} needs matplotlib: pip install 'mmap-deploy[plot]'") from None


def overview_path(out: Path) -> Path:
    """Where `--overview` writes the picture: next to the output, `{stem}.overview.png`."""
    return out.with_name(f"{out.stem}.overview.png")


def outline_rings(adata: "anndata.AnnData") -> list[np.ndarray]:
    """The tissue outline's rings in level-0 pixels, (n, 2) x, y each; empty when the run has none."""
    outline = adata.uns.get("mmap", {}).get("tissue_outline")
    if not outline:
        return []
    xy = np.asarray(outline["xy"], dtype=np.float64)
    start = np.asarray(outline["ring_start"], dtype=np.int64)
    return [xy[a:b] for a, b in zip(start[:-1], start[1:])]


def draw_outline(ax, adata: "anndata.AnnData", scale: float, linewidth: float = 1.2) -> None:
    """Draw the tissue outline (level-0 px times `scale`) on a matplotlib axis."""
    for ring in outline_rings(adata):
        closed = np.vstack([ring, ring[:1]]) * scale
        ax.plot(closed[:, 0], closed[:, 1], color=OUTLINE_COLOUR, linewidth=linewidth)


def flagged_spots(adata: "anndata.AnnData") -> dict[str, np.ndarray]:
    """The spots the overview marks, by what is wrong: boolean masks over the spots, only those the run has.

    ``"image QC failed"``: `obs['qc_pass']` is False. ``"low familiarity"``:
    `obs['mmap_familiarity']` under ``uns['mmap']['qc']['familiarity']['unfamiliar_below']``.
    """
    out = {}
    if "qc_pass" in adata.obs:
        out["image QC failed"] = ~np.asarray(adata.obs["qc_pass"], dtype=bool)
    record = (adata.uns.get("mmap", {}).get("qc") or {}).get("familiarity")
    if "mmap_familiarity" in adata.obs and isinstance(record, dict) and "unfamiliar_below" in record:
        below = float(record["unfamiliar_below"])
        out["low familiarity"] = np.asarray(adata.obs["mmap_familiarity"], dtype=np.float64) < below
    return out


def overview_title(adata: "anndata.AnnData") -> str:
    """What the picture says: the slide, the spots, the grid and the tissue (and a demo model, as such)."""
    mmap = adata.uns.get("mmap", {})
    parts = [str(mmap.get("library_id", "slide")), f"{adata.n_obs} spots"]
    if "grid" in mmap:
        parts.append(f"--grid {mmap['grid']['name']}")
    if "tissue" in mmap:
        t = mmap["tissue"]
        parts.append(f"tissue {float(t['area_mm2']):.1f} mm² in {int(t['pieces'])} piece(s) ({t['method']})")
    for what, spots in flagged_spots(adata).items():
        parts.append(f"{what}: {int(spots.sum())}")
    if mmap.get("bundle_demo"):
        parts.append("DEMO model")
    return " · ".join(parts)


def write_overview(adata: "anndata.AnnData", path: Path, library_id: str, title: str) -> Path:
    """Write the overview PNG atomically; returns `path`."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    lib = adata.uns["spatial"][library_id]
    img = lib["images"]["hires"]
    sf = lib["scalefactors"]
    scale = float(sf["tissue_hires_scalef"])
    h, w = img.shape[:2]
    px = min(1.0, MAX_SIDE / max(h, w))
    dpi = 100
    fig = Figure(figsize=(w * px / dpi, h * px / dpi / 0.95), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.95))
    ax.imshow(img, interpolation="antialiased")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64) * scale
    marker_pt = float(sf["spot_diameter_fullres"]) * scale * px * 72.0 / dpi
    pieces = np.asarray(adata.obs["tissue_id"]) if "tissue_id" in adata.obs else np.zeros(len(xy), np.int32)
    ax.scatter(xy[:, 0], xy[:, 1], c=pieces % 10, cmap="tab10", vmin=0, vmax=9, s=max(marker_pt, 0.5) ** 2,
               linewidths=0, alpha=0.55)
    draw_outline(ax, adata, scale)
    size = max(marker_pt, 2.0) ** 2
    marks = {"image QC failed": {"facecolors": "none", "edgecolors": QC_FAIL_COLOUR, "linewidths": 1.0},
             "low familiarity": {"marker": "x", "c": LOW_FAMILIARITY_COLOUR, "linewidths": 1.0}}
    shown = []
    for what, spots in flagged_spots(adata).items():
        if spots.any():
            shown.append(ax.scatter(xy[spots, 0], xy[spots, 1], s=size, label=f"{what} ({int(spots.sum())})",
                                    **marks[what]))
    if shown:
        ax.legend(handles=shown, loc="lower right", fontsize=8, framealpha=0.8)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    with atomic_path(path) as tmp:  # the output's folder exists: the output was written there first
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
