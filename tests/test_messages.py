"""How the three CLIs speak: `messages.run_cli`'s one-line errors."""

from __future__ import annotations

import pytest

from mmap_deploy.errors import UserError
from mmap_deploy.messages import EXIT_USER_ERROR, run_cli


def _refuse() -> None:
    raise UserError("slide.svs: no such file; check the path")


def test_a_user_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        run_cli(_refuse)
    assert exited.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: slide.svs: no such file; check the path\n"


def test_a_missing_extra_is_one_line_and_any_other_import_error_a_bug(capsys):
    def needs_ray():
        raise ModuleNotFoundError("No module named 'ray'", name="ray")

    def says(e: ModuleNotFoundError) -> str | None:
        return "--ray needs the [ray] extra: pip install 'mmap-deploy[ray]'" if e.name == "ray" else None

    with pytest.raises(SystemExit):
        run_cli(needs_ray, missing_extra=says)
    assert capsys.readouterr().err == "error: --ray needs the [ray] extra: pip install 'mmap-deploy[ray]'\n"
    with pytest.raises(ModuleNotFoundError):
        run_cli(lambda: __import__("no_such_module_here"), missing_extra=says)


def test_run_cli_takes_no_prefix():
    """Every CLI's error line starts with `error: `: there is no prefix to set."""
    with pytest.raises(TypeError):
        run_cli(_refuse, prefix="mmap-train: ")  # type: ignore[call-arg]


def test_command_line_is_quoted_as_a_shell_reads_it_back():
    import shlex

    from mmap_deploy.messages import command_line

    args = ["phase2", "--out", "run 1/out", "--sections", "A2,A3", "--genes", "it's.txt"]
    line = command_line("mmap-train", args)
    assert line.startswith("mmap-train phase2 --out 'run 1/out' ")
    assert shlex.split(line) == ["mmap-train", *args]
