"""The command line's names: `groupnorm demo` is what `make demo` runs (the quick reproduction),
`groupnorm modes` shows the four modes on one tensor."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_experiment_data import write_fake_dataset

from groupnorm.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_make_demo_calls_groupnorm_demo():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "no demo target in the Makefile"
    assert "-m groupnorm demo" in recipe.group(1)
    assert set(COMMANDS) >= {"demo", "modes", "reproduce", "bench"}


def test_modes_prints_the_four_modes_and_their_errors(capsys):
    assert main(["modes", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for mode in ("batch", "layer", "instance", "group"):
        line = next(l for l in out.splitlines() if l.startswith(mode))
        err = float(line.split()[-1])  # max error against the float64 reference
        assert 0 <= err < 1e-5, line
    assert "BN depends on the rest of the batch" in out


def test_demo_is_the_quick_preset_with_resume(tmp_path):
    write_fake_dataset(tmp_path / "data", n_train=256, n_test=64)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "groupnorm",
        "demo",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--train-size",
        "256",
        "--epochs",
        "1",
        "--width",
        "8",
        "--seeds",
        "1",
        "--jobs",
        "1",
        "--threads",
        "1",
        "--no-progress",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "--preset quick" in first.stdout
    report = (out / "report.md").read_text()
    assert "preset `quick`" in report
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4  # BN and GN at 32 and 1 images per worker, one seed
    # a second call resumes: nothing is trained again, the records stay as they were
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (out / "results.jsonl").read_text().splitlines() == lines


def test_demo_without_data_says_how_to_get_it(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "modes"])
def test_help_names_the_command(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert f"groupnorm {command}" in capsys.readouterr().out


def test_reproduce_without_its_extra_names_the_extra(tmp_path):
    # a tqdm that does not import stands for an install without the `experiment` extra
    (tmp_path / "tqdm").mkdir()
    (tmp_path / "tqdm" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "groupnorm", "demo", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "tqdm" in proc.stderr and "groupnorm[experiment]" in proc.stderr
