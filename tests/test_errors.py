"""`errors.first_line`: the one line an error report shows of an exception, whatever its message."""

from __future__ import annotations

import pytest

from mmap_deploy.errors import UserError, first_line


class _BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


@pytest.mark.parametrize(("exc", "line", "typed"), [
    (OSError("disk gone"), "disk gone", "OSError: disk gone"),
    (RuntimeError("first\nsecond\nthird"), "first", "RuntimeError: first"),
    (ValueError("\n  \n  the real one  \nmore"), "the real one", "ValueError: the real one"),
    (RuntimeError(), "RuntimeError", "RuntimeError"),  # an empty message: str(e).splitlines()[0] raised IndexError
    (UserError(""), "UserError", "UserError"),
    (ImportError("   \n\n"), "ImportError", "ImportError"),
    (_BrokenStr(), "_BrokenStr", "_BrokenStr"),
])
def test_first_line_of_any_exception(exc, line, typed):
    assert first_line(exc) == line
    assert first_line(exc, with_type=True) == typed
