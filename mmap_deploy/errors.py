"""Errors a user can act on.

`UserError` is for bad input: the CLI prints its one-line message and exits
non-zero without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, row, value), with the fix in the message.

    The message is one line, the one ``mmap-predict`` prints; `BundleError`,
    `EngineMismatchError` and `OutputStorageError` are kinds of it.

    Examples
    --------
    >>> import mmap_deploy as mm
    >>> try:                                                            # doctest: +SKIP
    ...     adata = mm.predict("slide.svs", "spots.csv")
    ... except mm.UserError as e:
    ...     print(f"skipped: {e}")
    """


class BundleError(UserError):
    """A model bundle that is missing, damaged, or does not match its manifest."""


class EngineMismatchError(BundleError):
    """A TensorRT engine built for another GPU or TensorRT version."""


class OutputStorageError(UserError):
    """The output folder has no room, or cannot be written: a batch stops here (see storage.py)."""


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first non-blank line of `exc`'s message, for a one-line report; never raises.

    An exception with an empty (or blank) message, or one whose `str()`
    fails, gives its type name instead. `with_type=True` prefixes the type
    ("OSError: ..."), still only the type name when there is no message.
    """
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not crash the report of the error
        text = ""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        return name
    return f"{name}: {line}" if with_type else line


class MMAPWarning(UserWarning):
    """A finding about the input that the run went on with (a resolution that contradicts the slide,
    spots off tissue, a Space Ranger image that does not fit): raised through `warnings.warn`.

    Examples
    --------
    Stop on every finding instead of going on:

    >>> import warnings
    >>> import mmap_deploy as mm
    >>> with warnings.catch_warnings():                                 # doctest: +SKIP
    ...     warnings.simplefilter("error", mm.MMAPWarning)
    ...     adata = mm.predict("slide.svs", "spots.csv")
    """
