"""The runner every backend shares: load, infer, close; a context manager.

`Runner.infer(feeds)` checks the feeds once against what the model declares
(input names, dtypes, shapes, one batch size for all) and splits a batch the
engine cannot take in one call into chunks; each backend implements only
`infer_impl` (run one checked chunk) and `close_impl`. numpy in and out, by
tensor name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One model input as the model declares it.

    `shape` has None for a dynamic axis; `max_shape`, where the engine has one
    (a TensorRT optimisation profile), is the largest shape it takes. `dtype`
    None: the model's type has no numpy equivalent, and is not checked here.
    """

    name: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...]
    max_shape: tuple[int, ...] | None = None


class Runner:
    """One loaded model: `infer(feeds)` by tensor name, `close()`; a context manager.

    `.name` says which backend it is, `.providers` what it runs on,
    `.precision` the precision of the file it runs, `.path` the file.
    """

    name: str = "runner"
    path: Path
    precision: str = "fp32"
    providers: list[str]
    inputs: list[TensorSpec]
    output_names: list[str]
    max_batch: int = 0  # the most spots one engine call takes; 0: no limit
    streams: int = 1  # calls the pipeline may have in flight at once (thread-safe runs)
    _closed: bool = False

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def infer(self, feeds: dict[str, np.ndarray], *, batch_size: int = 0) -> dict[str, np.ndarray]:
        """Outputs by name for `feeds` by input name.

        The feeds are checked first (ValueError naming the input and what the
        model takes). Batches larger than `batch_size` (when > 0) or than the
        engine's `max_batch` run in chunks, concatenated in order.
        """
        arrays = self.check_feeds(feeds)
        n = next(iter(arrays.values())).shape[0]
        step = min((s for s in (batch_size, self.max_batch) if s > 0), default=0)
        if step == 0 or n <= step:
            return self.infer_impl(arrays)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.output_names}
        for start in range(0, n, step):
            out = self.infer_impl({k: v[start : start + step] for k, v in arrays.items()})
            for k in self.output_names:
                parts[k].append(out[k])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds as the model takes them, in its input order; ValueError on anything else."""
        if self._closed:
            raise RuntimeError(f"{self.path.name}: the runner is closed")
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {missing}; it takes {self.input_names}")
        unknown = [k for k in feeds if k not in self.input_names]
        if unknown:
            raise ValueError(f"{self.path.name}: unknown inputs {unknown}; it takes {self.input_names}")
        arrays: dict[str, np.ndarray] = {}
        batch: tuple[str, int] | None = None
        for spec in self.inputs:
            a = np.asarray(feeds[spec.name])
            what = f"{self.path.name}: input {spec.name!r}"
            if spec.dtype is not None and a.dtype != spec.dtype:
                raise ValueError(f"{what} is {a.dtype}; the model takes {spec.dtype}")
            if a.ndim != len(spec.shape):
                raise ValueError(f"{what} has shape {a.shape}; the model takes {_shape_text(spec)}")
            for axis, (got, want) in enumerate(zip(a.shape, spec.shape)):
                too_big = axis > 0 and spec.max_shape is not None and got > spec.max_shape[axis]
                if (want is not None and got != want) or too_big:
                    raise ValueError(f"{what} has shape {a.shape}; the model takes {_shape_text(spec)}")
            if a.ndim:
                if batch is not None and a.shape[0] != batch[1]:
                    raise ValueError(f"{what} has {a.shape[0]} rows but {batch[0]!r} has {batch[1]}; "
                                     "every input needs one row per spot")
                batch = batch or (spec.name, a.shape[0])
            arrays[spec.name] = a
        return arrays

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        """Run one checked chunk (the backend's part)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine; `infer` is an error afterwards. Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self.close_impl()

    def close_impl(self) -> None:  # pragma: no cover
        pass

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path.name}, {self.precision}, providers={self.providers})"


def _shape_text(spec: TensorSpec) -> str:
    dims = ["N" if i == 0 and d is None else ("?" if d is None else str(d)) for i, d in enumerate(spec.shape)]
    text = f"({', '.join(dims)})"
    if spec.max_shape is not None:
        text += f" up to {tuple(spec.max_shape)}"
    return text
