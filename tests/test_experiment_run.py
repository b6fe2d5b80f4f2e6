"""Training runs, the grid, the results file, resume, SIGKILL, the lock and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from groupnorm.cli import main
from groupnorm.experiments import runner
from groupnorm.experiments.data import load_fashion_mnist
from groupnorm.experiments.model import NORMS
from groupnorm.experiments.report import format_table, markdown_table, science_checks
from groupnorm.experiments.results import (
    DirectoryLocked,
    RunDirLock,
    append_result,
    read_results,
)
from groupnorm.experiments.train import Protocol, RunSpec, train_run

sys.path.insert(0, str(Path(__file__).parent))
from test_experiment_data import write_fake_dataset  # noqa: E402

TINY = Protocol(workers=4, train_size=64, epochs=1, width=4, groups=2)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    write_fake_dataset(folder, n_train=256, n_test=64)
    return folder


@pytest.mark.parametrize("norm", NORMS)
def test_smoke_run_every_norm(fake_data, norm):
    data = load_fashion_mnist(fake_data, check_counts=False)
    record = train_run(TINY, RunSpec(norm, 4, seed=0), data)
    assert record["steps"] == 64 // 16 and record["total_batch"] == 16
    assert record["lr"] == pytest.approx(0.1 * 16 / 256)
    assert 0 <= record["test_error"] <= 100 and record["train_loss"] > 0
    json.dumps(record)  # serialisable
    # deterministic: the same seed gives the same run
    again = train_run(TINY, RunSpec(norm, 4, seed=0), data)
    assert again["test_error"] == record["test_error"]
    assert again["train_loss"] == record["train_loss"]


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_small_steps_run_channels_last_and_repeat(fake_data, norm, monkeypatch):
    """At most SMALL_STEP images a step, training runs in channels-last; a run repeats bit for
    bit and its test pass sees the default layout again."""
    from groupnorm.experiments import train

    data = load_fashion_mnist(fake_data, check_counts=False)
    layouts = []
    evaluate = train.evaluate

    def spy(model, *args, **kwargs):
        layouts.append(model.stem.weight.is_contiguous())
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", spy)
    seen = []
    conv2d = torch.nn.functional.conv2d

    def spy_conv(x, *args, **kwargs):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1)
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy_conv)
    run = RunSpec(norm, 2, seed=0)  # 4 workers x 2 images = 8 images a step
    record = train_run(TINY, run, data)
    again = train_run(TINY, run, data)
    assert any(seen) and layouts == [True, True]
    assert again["test_error"] == record["test_error"]
    assert again["train_loss"] == record["train_loss"]


def test_results_file_torn_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, {"key": "a", "test_error": 1.0})
    with open(path, "ab") as f:
        f.write(b'{"key": "b", "test_er')  # a writer killed mid-line
    with pytest.warns(UserWarning, match="unreadable line"):
        assert [r["key"] for r in read_results(path)] == ["a"]
    append_result(path, {"key": "c", "test_error": 3.0})  # stays a whole line
    with pytest.warns(UserWarning, match=":2:"):
        assert [r["key"] for r in read_results(path)] == ["a", "c"]
    assert read_results(tmp_path / "missing.jsonl") == []


def _tiny_preset(**kw):
    fields = dict(
        name="tiny",
        description="tiny",
        protocol=TINY,
        norms=("bn", "gn"),
        batch_sizes=(4, 2),
        seeds=2,
    )
    fields.update(kw)
    return runner.Preset(**fields)


def test_resume_after_interrupt(tmp_path, fake_data, monkeypatch):
    preset = _tiny_preset()
    planned = [r.key for r in runner.plan_runs(preset)]
    assert len(planned) == len(set(planned)) == 8

    def loader():
        return load_fashion_mnist(fake_data, check_counts=False)

    real_train = runner.train_run
    calls = []

    def interrupted(protocol, run, data, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(run.key)
        return real_train(protocol, run, data, **kw)

    monkeypatch.setattr(runner, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_grid(preset, tmp_path, loader, progress=False, log=lambda s: None)
    assert [r["key"] for r in read_results(tmp_path / "results.jsonl")] == calls == planned[:3]

    monkeypatch.setattr(
        runner, "train_run", lambda *a, **k: calls.append(a[1].key) or real_train(*a, **k)
    )
    records = runner.run_grid(preset, tmp_path, loader, progress=False, log=lambda s: None)
    assert calls == planned  # nothing trained twice
    on_disk = [r["key"] for r in read_results(tmp_path / "results.jsonl")]
    assert sorted(on_disk) == sorted(planned) == sorted(r["key"] for r in records)

    # a changed protocol is refused rather than mixed into the same file
    other = _tiny_preset(protocol=Protocol(workers=4, train_size=64, epochs=2, width=4))
    with pytest.raises(ValueError, match="different protocol"):
        runner.run_grid(other, tmp_path, loader, progress=False)

    table = format_table(records)
    assert "BN" in table and "GN" in table and "±" in table
    assert markdown_table(records).count("\n") == 3
    claims = [c for c, _, _ in science_checks(records)]
    assert any("GN better than BN at 2" in c for c in claims)


def _cli(args, data, out):
    return [
        sys.executable,
        "-m",
        "groupnorm",
        "reproduce",
        "--data",
        str(data),
        "--out",
        str(out),
        "--norms",
        "bn,gn",
        "--batch-sizes",
        "4,2",
        "--seeds",
        "2",
        "--train-size",
        "256",
        "--epochs",
        "1",
        "--width",
        "8",
        "--jobs",
        "1",
        "--threads",
        "1",
        "--no-progress",
        *args,
    ]


def test_sigkill_mid_grid_then_resume(tmp_path, fake_data, capsys):
    out = tmp_path / "run"
    results = out / "results.jsonl"
    proc = subprocess.Popen(
        _cli([], fake_data, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_results(results)
    assert 1 <= len(before) < 8

    # without --resume a directory with results is refused
    assert main(_cli([], fake_data, out)[3:]) == 1
    assert "--resume" in capsys.readouterr().err

    done = subprocess.run(_cli(["--resume"], fake_data, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = read_results(results)
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)) == 8
    assert after[: len(before)] == before  # finished runs kept, as they were
    for name in ("report.md", "table.txt", "table.md", "error_vs_batch.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "error_vs_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1 error" in done.stdout and "GN" in (out / "table.txt").read_text()


def test_lock_refuses_a_second_writer(tmp_path, fake_data, capsys):
    with RunDirLock(tmp_path):
        with pytest.raises(DirectoryLocked, match=f"pid {os.getpid()}"):
            with RunDirLock(tmp_path):
                pass
        status = main(
            ["reproduce", "--data", str(fake_data), "--out", str(tmp_path), "--no-progress"]
        )
        assert status == 1
        assert "in use by another" in capsys.readouterr().err
    with RunDirLock(tmp_path):  # free again once released
        pass


def test_cli_missing_data_and_bad_options(tmp_path, capsys):
    assert main(["reproduce", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "--data" in err
    with pytest.raises(SystemExit):
        main(["reproduce", "--norms", "bn,wn"])
    assert "unknown normalization" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "--batch-sizes", "4,0"])
    assert main(["reproduce", "--workers", "3", "--data", str(tmp_path)]) == 2


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--preset",
        "--data",
        "--out",
        "--resume",
        "--norms",
        "--batch-sizes",
        "--seeds",
        "--workers",
        "--jobs",
        "--threads",
        "--no-progress",
        "--epochs",
        "--train-size",
        "--width",
        "--lr",
        "--groups",
        "quick",
        "default",
        "paper",
    ):
        assert option in text


def test_presets_fit_their_promises():
    quick, default, paper = (runner.PRESETS[k] for k in ("quick", "default", "paper"))
    assert quick.norms == ("bn", "gn") and set(quick.batch_sizes) == {32, 1}
    assert default.norms == ("bn", "gn", "ln", "in") and default.batch_sizes == (32, 16, 8, 4, 2)
    assert paper.seeds >= 3 and paper.sweep_groups == (1, 2, 4, 8, 16, 32)
    assert len(runner.plan_runs(paper)) == 6 * 5 * 3 + 6 * 3
    for p in (quick, default, paper):  # every setting sees the same epochs and scaled lr
        assert p.protocol.train_size % (p.protocol.workers * max(p.batch_sizes)) < (
            p.protocol.workers * max(p.batch_sizes)
        )
        assert torch.tensor(p.batch_sizes).min() >= 1


def test_gn_flatness_check_names_the_steps_per_batch_size():
    def rec(norm, b, seed, err, steps):
        return {
            "norm": norm,
            "images_per_worker": b,
            "seed": seed,
            "groups": None,
            "test_error": err,
            "steps": steps,
        }

    records = [rec("gn", 32, s, 17.0 + s, 234) for s in (0, 1)]
    records += [rec("gn", 1, s, 14.0 + s / 10, 7500) for s in (0, 1)]
    checks = {claim: (ok, detail) for claim, ok, detail in science_checks(records)}
    ok, detail = checks["GN's mean error varies by at most 1 point across batch sizes"]
    assert ok is False
    assert "= 3.45" in detail and "32: 234, 1: 7500" in detail
