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
