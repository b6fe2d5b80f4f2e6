"""The benchmark suite works and writes well-formed results (not how fast anything is)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from groupnorm import cli
from groupnorm.bench import cases, suite
from groupnorm.bench.memory import peak_bytes, retained_bytes
from groupnorm.bench.timing import measure, percentile


def test_quick_run_writes_well_formed_csv_and_plots(tmp_path):
    out = tmp_path / "quick.csv"
    assert cli.main(["bench", "--quick", "--out", str(out), "--plot"]) == 0
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == suite.FIELDS
        rows = list(reader)
    assert rows
    for r in rows:
        for key in suite.FIELDS:
            if key not in ("p20", "p80"):
                assert r[key] != "", (key, r)
        value = float(r["value"])
        assert math.isfinite(value) and value >= 0, r
        if r["metric"] == "time_us":
            assert float(r["p20"]) <= value <= float(r["p80"]), r
        if r["metric"] in ("speedup_vs_torch", "vs_copy", "ratio_vs_torch_bn"):
            assert float(r["p20"]) > 0 and float(r["p80"]) > 0, r
        assert "cores" in r["machine"] and "torch" in r["machine"]
    ops = {r["op"] for r in rows}
    assert set(cases.OPS) <= ops and "resnet_step" in ops
    for op in cases.OPS:
        got = {(r["provider"], r["mode"], r["metric"]) for r in rows if r["op"] == op}
        for mode in cases.MODES:
            for provider in ("ours", "torch"):
                for metric in ("time_us", "gbps", "speedup_vs_torch", "vs_copy"):
                    assert (provider, mode, metric) in got, (op, provider, mode, metric)
            assert ("copy", mode, "time_us") in got
        assert ("ours", "forward", "retained_bytes") in got
        assert ("torch", "forward+backward", "peak_bytes") in got
    torch_ratio = {
        float(r["value"])
        for r in rows
        if r["provider"] == "torch" and r["metric"] == "speedup_vs_torch"
    }
    assert torch_ratio == {1.0}
    step = {r["provider"] for r in rows if r["op"] == "resnet_step"}
    assert step == {"torch_bn", "torch_gn", "ours_gn"}
    for op in cases.OPS:
        assert (tmp_path / f"quick-{op}.png").stat().st_size > 1000


def test_percentiles_and_interleaved_timing():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 20) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        percentile([], 50)
    calls = {"a": 0, "b": 0}

    def make(name):
        def f():
            calls[name] += 1

        return f

    t = measure({"a": make("a"), "b": make("b")}, repeats=4, warmup=1)
    assert t["a"].samples == 4 and t["b"].samples == 4
    assert calls["a"] > 4 and calls["b"] > 4
    with pytest.raises(ValueError):
        measure({"a": make("a")}, repeats=0)


def test_memory_metrics_see_the_unfused_pair():
    x = torch.randn(8, 32, 16, 16)
    size = x.numel() * 4
    xs = x.clone().requires_grad_()
    unfused = retained_bytes(
        lambda: torch.nn.functional.silu(torch.nn.functional.group_norm(xs, 8))
    )
    assert 2 * size <= unfused <= 2 * size + 4096  # x and the group norm output
    peak = peak_bytes(lambda: torch.nn.functional.silu(torch.nn.functional.group_norm(x, 8)))
    assert 2 * size <= peak <= 2 * size + 4096  # both outputs live at once


def test_minimal_traffic_and_groups():
    assert cases.minimal_bytes((2, 4, 8), torch.float32, "forward") == 2 * 64 * 4
    assert cases.minimal_bytes((2, 4, 8), torch.bfloat16, "forward+backward") == 5 * 64 * 2
    assert cases.groups_for(320) == 32 and cases.groups_for(16) == 16 and cases.groups_for(48) == 24


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--ops", "nope"], "unknown op"),
        (["--shapes", "nope"], "unknown shape set"),
        (["--ops", "gn", "--dtypes", "int8"], "unknown dtype"),
        (["--ops", "gn", "--layouts", "weird"], "--layouts"),
        (["--ops", "gn", "--modes", "sideways"], "unknown mode"),
    ],
)
def test_bad_arguments_say_what_to_do(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        cli.main(["bench", *argv, "--out", str(tmp_path / "x.csv")])


def test_default_plan_covers_every_op_and_rank():
    plan = suite.default_plan()
    seen = {(c.op, c.dtype, c.layout) for c, _ in plan.cases()}
    for op in cases.OPS:
        assert any(s[0] == op for s in seen)
    assert ("gn_silu", torch.bfloat16, "channels_last") in seen
    dims = {len(c.shape) for c, _ in plan.cases()}
    assert dims == {3, 4, 5}


def test_summary_table_groups_and_lists_the_slow_shapes():
    from groupnorm.bench.report import summary_table

    def row(shape, value, op="gn", dtype="float32"):
        return {
            "op": op,
            "provider": "ours",
            "metric": "speedup_vs_torch",
            "mode": "forward",
            "shape": shape,
            "dtype": dtype,
            "layout": "contiguous",
            "value": str(value),
        }

    rows = [row("8x256x56x56", 0.9), row("1x64x16x16", 1.5), row("4x256x56x56", 1.2)]
    rows += [row("2x8x4x4", 0.5), row("8x256x56x56", 2.0, op="ln")]
    rows.append({**row("8x256x56x56", 9.0), "provider": "torch"})  # not ours: ignored
    lines = summary_table(rows).splitlines()
    assert len(lines) == 2 + 3  # header, rule, gn larger, gn small, ln larger
    gn = next(line for line in lines if line.startswith("| gn |") and "larger" in line)
    assert "| 2 | 0.90 | 1.05 | 1.20 | 8x256x56x56 0.90 |" in gn
    small = next(line for line in lines if "up to 16k" in line)
    assert "| 2 | 0.50 |" in small and "2x8x4x4 0.50" in small  # 1x64x16x16 (16384) is small
    ln = next(line for line in lines if line.startswith("| ln |"))
    assert ln.endswith("| -" + " |")
    # a slow cell whose torch calls faulted in fresh pages is marked; ours' few faults are not
    faults = [
        {**row("8x256x56x56", 40.0), "provider": "torch", "metric": "page_faults"},
        {**row("4x256x56x56", 2.0), "metric": "page_faults"},
    ]
    gn = next(line for line in summary_table(rows + faults).splitlines() if "larger" in line)
    assert "8x256x56x56 (paging) 0.90" in gn and "4x256x56x56 (paging)" not in gn


def test_page_faults_are_counted_per_call():
    """measure() counts minor page faults per call: a call that maps and touches 64 fresh
    pages faults at least that often, one that allocates nothing about never."""
    import mmap

    resource = pytest.importorskip("resource")
    assert resource is not None

    def fresh_pages():
        m = mmap.mmap(-1, 64 * mmap.PAGESIZE)
        for i in range(0, 64 * mmap.PAGESIZE, mmap.PAGESIZE):
            m[i] = 1
        m.close()

    t = measure({"fresh": fresh_pages, "none": lambda: None}, repeats=3, warmup=1)
    assert t["fresh"].faults >= 63, t["fresh"].faults
    assert t["none"].faults < 1, t["none"].faults
