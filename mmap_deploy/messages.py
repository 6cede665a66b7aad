"""How the runtime speaks: warnings through `warnings`, notes through `logging`; nothing is printed.

- A finding about the input that the run goes on with (the geometry checks'
  warnings, an `mpp` that contradicts the slide, a blank thumbnail) is a
  `warnings.warn(..., MMAPWarning)`: Python shows it once per place, as it
  does any library's warnings, and `warnings.filterwarnings` silences it.
- A note (the demo model is in use; which engines were picked) is a log
  record of the `mmap_deploy` logger at INFO. The logger has a `NullHandler`,
  so a library user sees nothing unless they configure logging.
- Progress (`progress()`) is a tqdm bar on a terminal and, on a file or a pipe
  (a SLURM log, `> run.log`), a line at the start, at each tenth done and at
  the end, instead of thousands of carriage-return redraws.
- `show_on_stderr()` is what `mmap-predict` (and each of its Ray workers)
  runs inside: every warning as one line `warning: ...` and every note as
  its line (`note: ...`, `engines: ...`) on stderr, as the CLI has always
  written them.
- The three CLIs speak through `echo` (one line on stderr), exit with
  `EXIT_*`, turn a `UserError` into their one-line `error: ...` with
  `run_cli`, and record how they were called with `command_line`.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO, TypeVar

from .errors import MMAPWarning, UserError

_T = TypeVar("_T")

LOGGER_NAME = "mmap_deploy"
logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())  # a library logs, the application decides what is shown

_PREFIX = "mmap_prefix"  # a record's attribute: the prefix the CLI puts before its message


def warn(message: str) -> None:
    """Warn about the input (`MMAPWarning`); the CLI shows it as `warning: {message}`."""
    warnings.warn(message, MMAPWarning, stacklevel=2)


def note(message: str) -> None:
    """A note for the user (INFO); the CLI shows it as `note: {message}`."""
    logger.info(message, extra={_PREFIX: "note: "})


def info(message: str) -> None:
    """A line of information (INFO); the CLI shows it as it is."""
    logger.info(message)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _LineHandler(logging.Handler):
    def __init__(self, echo: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = "warning: " if record.levelno >= logging.WARNING else getattr(record, _PREFIX, "")
            self.echo(prefix + record.getMessage())
        except Exception:  # noqa: BLE001  # pragma: no cover (logging's own rule: a handler never raises)
            self.handleError(record)


@contextlib.contextmanager
def show_on_stderr(echo: Callable[[str], None] = _stderr) -> Iterator[None]:
    """Inside the block, show the runtime's notes and warnings as one-line messages through `echo`.

    Every `MMAPWarning` is shown, each time it is raised (a batch warns about
    each slide); other warnings keep Python's own display.
    """
    handler = _LineHandler(echo)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", MMAPWarning)
            shown_by_python = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if issubclass(category, MMAPWarning):
                    echo(f"warning: {message}")
                else:
                    shown_by_python(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


PROGRESS_STEPS = 10  # lines a progress bar writes to a file or pipe, besides its first and last


def progress(total: int | None, desc: str, enabled: bool = True, *, unit: str = "it", initial: int = 0,
             leave: bool = True, position: int | None = None, file: TextIO | None = None) -> Any:
    """A progress bar for a loop of `total` steps (None: not known in advance), on `file` (default stderr).

    On a terminal (or a notebook, which redraws a line in place) it is a
    tqdm bar. On a file or a pipe (a SLURM log, `> run.log`) it is a
    `ProgressLines`: one line at the start, one at each tenth done, one at
    the end. `enabled=False`: a bar that shows nothing. Either way the caller
    uses `update(n)`, `set_postfix(**values)`, `close()`, `.n`, or `with`.
    `leave` and `position` are tqdm's (keep the bar when done; its row).
    """
    from tqdm import tqdm

    stream = sys.stderr if file is None else file
    if not enabled or stream is None:
        return tqdm(total=total, disable=True)
    if _redraws_in_place(stream):
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, position=position, file=stream,
                    dynamic_ncols=True)
    return ProgressLines(total, desc, unit=unit, initial=initial, file=stream)


def _redraws_in_place(stream: TextIO) -> bool:
    """A terminal, or a Jupyter notebook's stream (not a tty, but it draws a carriage return in place)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    iostream = sys.modules.get("ipykernel.iostream")
    return iostream is not None and isinstance(stream, iostream.OutStream)


class ProgressLines:
    """A progress bar for a file or a pipe: a line at the start, at each tenth of `total` done and at the end
    (only the first and the last when `total` is not known), e.g. `phase 2: 300/1000 steps (30%) in 00:12`."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0,
                 file: TextIO | None = None):
        self.total, self.desc, self.n, self.file = total, desc, initial, file
        self.units = unit if unit.endswith("s") else unit + "s"
        self.postfix = ""
        self._t0 = time.perf_counter()
        self._said_step, self._said_n, self._closed = self._step(initial), initial, False
        self._say()

    def _step(self, n: int) -> int:
        return PROGRESS_STEPS * n // self.total if self.total else 0

    def _say(self) -> None:
        from tqdm import tqdm

        done = f"{self.n}/{self.total} {self.units} ({100 * self.n // self.total}%)" if self.total else \
            f"{self.n} {self.units}"
        line = f"{self.desc}: {done} in {tqdm.format_interval(time.perf_counter() - self._t0)}"
        print(line + (f", {self.postfix}" if self.postfix else ""), file=self.file or sys.stderr, flush=True)
        self._said_n = self.n

    def update(self, n: int = 1) -> None:
        """`n` more steps done; a line when a new tenth is reached."""
        self.n += n
        step = self._step(self.n)
        if step > self._said_step:
            self._said_step = step
            self._say()

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next lines (`loss=0.1234`)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """The last line (unless the last tenth already said where the loop ended)."""
        if not self._closed:
            self._closed = True
            if self.n != self._said_n or not self.total:
                self._say()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The console and exit policy of the three CLIs (mmap-predict, mmap-train, mmap-export).
EXIT_OK = 0
EXIT_BATCH_FAILED = 1  # mmap-predict --manifest: some slides failed (the others are written)
EXIT_USER_ERROR = 2  # a mistake in the input: one line `error: ...`, no output


def command_line(prog: str, args: Sequence[str] | None = None) -> str:
    """`prog ARGS` as one line for a run's provenance, quoted as a shell reads it back.

    `args`: the arguments as given (default `sys.argv[1:]`). Quoting (`shlex.join`)
    keeps a path with spaces one argument: `--out 'run 1'`, not `--out run 1`.
    """
    return shlex.join([prog, *(sys.argv[1:] if args is None else args)])


def echo(msg: str) -> None:
    """One line for the user, on stderr (stdout stays free for data)."""
    import click

    click.echo(msg, err=True)


def run_cli(body: Callable[[], _T], *, missing_extra: Callable[[ModuleNotFoundError], str | None] | None = None) -> _T:
    """Run a CLI's `body`; a UserError is one line `error: ...` on stderr and exit code 2.

    So is a missing optional extra, when `missing_extra` turns the
    ModuleNotFoundError into a message (None: a bug, it propagates with its
    traceback, as does any other exception). Returns what `body` returns.
    """
    try:
        return body()
    except UserError as e:
        message = str(e)
    except ModuleNotFoundError as e:
        found = missing_extra(e) if missing_extra is not None else None
        if found is None:
            raise
        message = found
    echo(f"error: {message}")
    sys.exit(EXIT_USER_ERROR)
