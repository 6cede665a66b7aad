"""What pen ink, black and blank glass look like: the colour rules, pixel by pixel.

One definition for the two places that look for them: tissue detection
(`tissue.py`, on an 8 µm image of the whole slide: artefacts are cut out before
its texture test) and the image QC of each spot (`spot_qc.py`, on the pixels the
encoder reads). Each rule takes the R, G and B planes as float32 arrays of one
shape and returns a boolean array of that shape.

H&E is pink to purple, with little green over red: on the her2st scans
G - R <= 26, G - R <= 0.19 x max(R,G,B) and B - R <= 80 everywhere. Blue and
green pen ink breaks one of these; black ink (and the black blocks some scanners
put outside the scanned field) is dark and unsaturated; blank out-of-field
blocks and the brightest bare glass are near-white in every channel.
"""

from __future__ import annotations

import numpy as np

INK_GREEN_RED = 30  # G - R at or above: green or blue ink (her2st H&E: at most 26)
INK_BLUE_RED = 100  # B - R at or above: blue ink (her2st H&E: at most 80)
INK_GREEN_RED_SHARE = 0.3  # G - R at or above this share of max(R,G,B): dark green/teal ink (her2st: 0.19)
INK_GREEN_RED_DARK_MIN = 8  # ... where G - R is at least this (grey levels), so grey noise is not ink
BLACK_MAX_VALUE = 100  # max(R,G,B) below this and ...
BLACK_MAX_SATURATION = 0.25  # ... saturation below this: black ink or a black out-of-field block
DARK_MAX_VALUE = 40  # max(R,G,B) below this: black, whatever its (noisy) saturation
WHITE_MIN = 245  # min(R,G,B) at or above: blank (out-of-field block, or bare bright glass)


def ink_coloured(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Blue or green pen ink: G - R >= `INK_GREEN_RED`, or B - R >= `INK_BLUE_RED`, or dark teal
    (G - R >= `INK_GREEN_RED_SHARE` of max(R,G,B) and at least `INK_GREEN_RED_DARK_MIN`)."""
    vmax = np.maximum(np.maximum(r, g), b)
    gr = g - r
    return (gr >= INK_GREEN_RED) | (b - r >= INK_BLUE_RED) | ((gr >= INK_GREEN_RED_DARK_MIN) & (gr >= INK_GREEN_RED_SHARE * vmax))


def black(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Black ink or a black block: dark and unsaturated (max < `BLACK_MAX_VALUE`, (max - min) <
    `BLACK_MAX_SATURATION` x max), or darker than `DARK_MAX_VALUE` whatever the saturation."""
    vmax = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    return ((vmax < BLACK_MAX_VALUE) & ((vmax - vmin) < BLACK_MAX_SATURATION * vmax)) | (vmax < DARK_MAX_VALUE)


def blank(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Near-white in every channel (min(R,G,B) >= `WHITE_MIN`): a blank block, or bright bare glass."""
    return np.minimum(np.minimum(r, g), b) >= WHITE_MIN
