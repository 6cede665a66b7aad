"""The training log of both phases: one row per epoch, as `log.json` and `log.csv`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def write_training_log(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """Write `history` to `out_dir/log.json` and `out_dir/log.csv`.

    The CSV has a column for every scalar key of any row, in order of first
    appearance (a key such as `kept` is only on some rows); nested values
    stay in the JSON.
    """
    (out_dir / "log.json").write_text(json.dumps(history, indent=1) + "\n")
    keys: list[str] = []
    for row in history:
        keys += [k for k, v in row.items() if k not in keys and not isinstance(v, (dict, list))]
    with (out_dir / "log.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
