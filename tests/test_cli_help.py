"""The command lines help: -h everywhere, a help line for every option, and a one-line error from
mmap-train and mmap-export in a runtime-only install (no torch). mmap-export's errors naming its own
options: tests/test_precision.py."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest


def _commands(command: click.Command, path: str):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, f"{path} {name}")


def _entry_points():
    from mmap_deploy.cli import main as predict
    from mmap_export.cli import main as export
    from mmap_train.cli import cli as train
    from mmap_train.make_demo import main as make_demo

    return [("mmap-train", train), ("mmap-export", export), ("mmap-predict", predict),
            ("python -m mmap_train.make_demo", make_demo)]


def test_every_option_has_a_help_line():
    missing = []
    for prog, command in _entry_points():
        for path, cmd in _commands(command, prog):
            for param in cmd.params:
                if isinstance(param, click.Option) and not (param.help or "").strip():
                    missing.append(f"{path} {param.opts[-1]}")
    assert not missing, missing


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["phase1", "-h"], ["phase2", "-h"], ["features", "-h"],
                                  ["evaluate", "-h"]])
def test_mmap_train_h(argv, capsys):
    from mmap_train.cli import main

    main(argv)  # returns: help is not an error
    out = capsys.readouterr().out
    assert out.startswith("Usage: mmap-train") and "-h, --help" in out


def _without_torch(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    """The entry point `module:main` in a fresh interpreter where `import torch` fails, as in `pip install .`."""
    code = ("import sys; sys.modules['torch'] = None; "
            f"sys.argv = {[module] + argv!r}; from {module} import main; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,argv", [
    ("mmap_train.cli", ["phase1", "--data-dir", ".", "--out", "runs/p1"]),
    ("mmap_train.cli", ["evaluate", "--checkpoint", "c.pt", "--features", "f", "--counts", "c", "--spots", "s",
                        "--genes", "g.txt", "--json", "m.json"]),
    ("mmap_export.cli", ["CHECKPOINT", "-o", "bundle"]),
])
def test_training_commands_without_torch_fail_in_one_line(module, argv, tmp_path):
    if argv[0] == "CHECKPOINT":
        (tmp_path / "c.pt").write_bytes(b"not opened: torch is missing first")
        argv = [str(tmp_path / "c.pt"), "-o", str(tmp_path / "bundle")]
    r = _without_torch(module, argv)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "pip install '.[train]'" in err and "'torch'" in err
    assert not (tmp_path / "bundle").exists()


def test_help_works_without_torch():
    r = _without_torch("mmap_train.cli", ["phase2", "-h"])
    assert r.returncode == 0 and "Usage: mmap-train phase2" in r.stdout, r.stderr
