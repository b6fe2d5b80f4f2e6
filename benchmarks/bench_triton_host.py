"""Host (Python) cost of one call of the Triton eager route on a plan-cache hit, without a GPU.

The kernel launches are replaced by a no-op, and the call runs on CPU tensors (the planner needs
``TRITON_INTERPRET=1`` to accept them; no kernel runs). Two numbers per case, medians over many
calls of the same shape (every call after the first is a plan-cache hit):

* ``to first launch``: from the call until the first kernel launch is reached; the Python work
  of the route before the GPU could start;
* ``whole call``: the call with every launch a no-op: everything the route does on the host
  except Triton's own launcher (allocations included).

    python benchmarks/bench_triton_host.py [--calls 10000] [--rounds 3] [--csv PATH]

Target: ``to first launch`` <= 10 us. What a real launch adds on a GPU host (the compiled
launcher, 3-6 us in public measurements; Triton's ``kernel[grid]`` path, tens of us) is not
measured here.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # the planner accepts CPU tensors only then

import torch  # noqa: E402


def _cases() -> list[tuple[str, dict, Callable[[], Callable[[], object]]]]:
    import groupnorm
    import groupnorm.kernels.triton as backend
    from groupnorm.kernels import Call, GradCall
    from groupnorm.kernels.triton import launch

    def gn(act, grad, residual=False, dtype=torch.float16, shape=(2, 320, 16, 16), groups=32):
        def make():
            x = torch.randn(shape).to(dtype).requires_grad_(grad)
            w = torch.randn(shape[1]).to(dtype)
            b = torch.randn(shape[1]).to(dtype)
            r = torch.randn(shape).to(dtype) if residual else None
            return lambda: backend.eager(Call(x, w, b, r, None, None, groups, False, 1e-5, act))

        return make

    def bn_train():
        x = torch.randn(8, 64, 14, 14)
        w, b = torch.randn(64), torch.randn(64)
        return lambda: backend.eager(Call(x, w, b, None, None, None, 64, True, 1e-5, "relu"))

    def bn_eval():
        x = torch.randn(8, 64, 14, 14)
        w, b = torch.randn(64), torch.randn(64)
        rm, rv = torch.randn(64), torch.rand(64) + 0.5
        return lambda: backend.eager(Call(x, w, b, None, rm, rv, 64, True, 1e-5, ""))

    def gn_backward():
        x = torch.randn(2, 320, 16, 16).half()
        w, b = torch.randn(320).half(), torch.randn(320).half()
        dy = torch.randn_like(x)
        mean, rstd = torch.zeros(2, 32), torch.ones(2, 32)
        grad = GradCall(dy, x, w, b, mean, rstd, 32, False, False, "silu", (True, True, True))
        return lambda: launch.launch_backward(grad)

    def api(grad):
        # the library's entry: argument checks and the dispatcher, then the backend
        def make():
            x = torch.randn(2, 320, 16, 16).half().requires_grad_(grad)
            w, b = torch.randn(320).half(), torch.randn(320).half()
            return lambda: groupnorm.group_norm(x, 32, w, b, activation="silu", backend="triton")

        return make

    split = {"GROUPNORM_TRITON_PATH": "split"}
    return [
        ("GN+SiLU fp16 2x320x16x16, fused, no grad", {}, gn("silu", False)),
        ("GN+SiLU fp16 2x320x16x16, fused, x requires grad", {}, gn("silu", True)),
        ("GN fp16 2x320x16x16, fused, residual, no grad", {}, gn("", False, residual=True)),
        ("GN+SiLU fp16 2x320x16x16, split, no grad", split, gn("silu", False)),
        ("BN+ReLU fp32 8x64x14x14 training, no grad", {}, bn_train),
        ("BN fp32 8x64x14x14 given stats, no grad", {}, bn_eval),
        ("GN+SiLU fp16 backward (dx, dw, db), fused", {}, gn_backward),
        ("group_norm(...) API, GN+SiLU fp16 2x320x16x16, no grad", {}, api(False)),
        ("group_norm(...) API, GN+SiLU fp16 2x320x16x16, x requires grad", {}, api(True)),
    ]


def measure(calls: int, rounds: int = 3) -> list[dict]:
    """Per case, the smallest over ``rounds`` interleaved rounds of the median of ``calls``
    timed calls (a shared machine's noise only ever adds time)."""
    from groupnorm.kernels.triton import handle, settings

    first = [0.0]

    def no_launch(self, *args):
        if not first[0]:
            first[0] = time.perf_counter()

    saved_call = handle.Launch.__call__
    cases = []
    try:
        for name, env, make in _cases():
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            settings.reload_config()  # the case's settings; its plan is made now, kept after
            fn = make()
            fn()  # plans the call (imports Triton, builds the launches)
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            cases.append((name, fn))
        # reload_config() would drop the plans: the environment is restored without it, so
        # every timed call below is a plan-cache hit of the plan made above.
        handle.Launch.__call__ = no_launch
        best: dict[str, list[float]] = {}
        clock = time.perf_counter
        for _ in range(rounds):
            for name, fn in cases:
                for _ in range(200):
                    fn()
                to_first, whole = [], []
                for _ in range(calls):
                    first[0] = 0.0
                    t0 = clock()
                    fn()
                    t1 = clock()
                    to_first.append(first[0] - t0)
                    whole.append(t1 - t0)
                pair = [statistics.median(to_first), statistics.median(whole)]
                best[name] = [min(a, b) for a, b in zip(best.get(name, pair), pair, strict=True)]
    finally:
        handle.Launch.__call__ = saved_call
        settings.reload_config()
    return [
        {
            "case": name,
            "to_first_launch_us": round(best[name][0] * 1e6, 2),
            "whole_call_us": round(best[name][1] * 1e6, 2),
        }
        for name, _ in cases
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10000, help="timed calls per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best kept")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.calls, args.rounds)
    machine = platform.processor() or platform.machine()
    print(
        f"# {machine}, Python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"best of {args.rounds} medians of {args.calls} calls"
    )
    print(f"{'case':<52} {'to first launch us':>19} {'whole call us':>14}")
    for row in rows:
        print(f"{row['case']:<52} {row['to_first_launch_us']:>19} {row['whole_call_us']:>14}")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
