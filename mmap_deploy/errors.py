"""Errors a user can act on.

`UserError` is for bad input: the CLI prints its one-line message and exits
non-zero without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (file, row, value), with the fix in the message."""


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
    spots off tissue, a Space Ranger image that does not fit): raised through `warnings.warn`."""
