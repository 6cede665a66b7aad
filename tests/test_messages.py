"""How the three CLIs speak: `messages.run_cli`'s one-line errors, the command line, progress."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from mmap_deploy.errors import UserError
from mmap_deploy.messages import EXIT_USER_ERROR, progress, run_cli


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


# -- progress: a bar on a terminal, a few lines in a log -------------------------------------
class _Terminal(io.StringIO):
    """A stream that says it is a terminal, as a console's stderr does."""

    def isatty(self) -> bool:
        return True


def test_progress_to_a_file_writes_a_line_per_tenth_not_a_redraw_per_update():
    log = io.StringIO()
    with progress(10_000, "phase 2", unit="step", file=log) as bar:
        for i in range(10_000):
            bar.update(1)
            if i == 4_999:
                bar.set_postfix(loss="0.1234")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) <= 12
    assert lines[0].startswith("phase 2: 0/10000 steps (0%) in ")
    assert [line.split(" (")[0] for line in lines[1:]] == [f"phase 2: {k * 1000}/10000 steps" for k in range(1, 11)]
    assert lines[-1].startswith("phase 2: 10000/10000 steps (100%) in ") and lines[-1].endswith(", loss=0.1234")


def test_progress_to_a_file_says_where_a_loop_stopped_and_counts_without_a_total():
    log = io.StringIO()
    bar = progress(1000, "phase 1", unit="step", initial=500, file=log)  # resumed half way
    bar.update(120)
    bar.close()
    bar.close()  # closing twice says nothing more
    assert [line.split(" in ")[0] for line in log.getvalue().splitlines()] == [
        "phase 1: 500/1000 steps (50%)", "phase 1: 620/1000 steps (62%)"]
    log = io.StringIO()
    with progress(None, "spots (all workers)", unit="spot", file=log) as bar:
        for _ in range(50):
            bar.update(100)
        assert bar.n == 5000
    assert [line.split(" in ")[0] for line in log.getvalue().splitlines()] == [
        "spots (all workers): 0 spots", "spots (all workers): 5000 spots"]


def test_progress_on_a_terminal_is_tqdm_and_disabled_is_silent():
    from tqdm import tqdm

    term = _Terminal()
    with progress(10_000, "B4.svs", unit="spot", file=term) as bar:
        assert isinstance(bar, tqdm)
        for _ in range(100):
            bar.update(100)
    assert "\r" in term.getvalue() and "B4.svs" in term.getvalue()
    quiet = _Terminal()
    with progress(10_000, "B4.svs", enabled=False, file=quiet) as bar:
        bar.update(10_000)
    assert quiet.getvalue() == ""


def test_mmap_predict_into_a_pipe_writes_progress_lines(tmp_path):
    """`mmap-predict ... 2> run.log` as on a cluster: stderr is a pipe, not a terminal."""
    proc = subprocess.run([sys.executable, "-c", "from mmap_deploy.cli import main; main()", "--demo",
                           "-o", str(tmp_path / "demo.h5ad")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bar = [line for line in proc.stderr.splitlines() if line.startswith("B4_crop.jpg: ")]
    assert "\r" not in proc.stderr and 2 <= len(bar) <= 12, proc.stderr
    assert bar[-1].startswith("B4_crop.jpg: 120/120 spots (100%) in ")
