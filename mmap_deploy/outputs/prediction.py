"""What one slide's run hands to the writers: the predictions and what was dropped on the way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..model.familiarity import SlideFamiliarity


@dataclass
class DroppedSpot:
    """A spot whose patch could not be read (after one retry)."""

    spot_id: str
    x: float
    y: float
    error: str


@dataclass
class SlidePrediction:
    """Everything `predict_slide` computed for one slide, in the input spot order (minus dropped spots)."""

    spot_ids: list[str] | np.ndarray  # a numpy string array when the input ids were one (Visium HD)
    xy: np.ndarray  # (N, 2) float64, level-0 (full-resolution) pixels
    prediction: np.ndarray  # (N, G) float32, the training log scale
    embedding: np.ndarray  # (N, D) float32, f
    clusters: np.ndarray  # (N,) int64, k-means prototype of each spot
    n_prototypes: int
    bank_size: int
    genes: list[str]
    dropped: list[DroppedSpot] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    engines: dict[str, str] = field(default_factory=dict)
    n_clipped: int = 0  # predicted values raised to PREDICTION_FLOOR
    familiarity: SlideFamiliarity | None = None  # None: the bundle has no training summary
    # (N, 3) float32 image QC per spot (inputs.spot_qc: qc_blur, qc_ink, qc_background), and how it was made
    qc: np.ndarray | None = None
    qc_record: dict = field(default_factory=dict)
