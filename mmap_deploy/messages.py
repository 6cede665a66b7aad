"""How the runtime speaks: warnings through `warnings`, notes through `logging`; nothing is printed.

- A finding about the input that the run goes on with (the geometry checks'
  warnings, an `mpp` that contradicts the slide, a blank thumbnail) is a
  `warnings.warn(..., MMAPWarning)`: Python shows it once per place, as it
  does any library's warnings, and `warnings.filterwarnings` silences it.
- A note (the demo model is in use; which engines were picked) is a log
  record of the `mmap_deploy` logger at INFO. The logger has a `NullHandler`,
  so a library user sees nothing unless they configure logging.
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
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

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
