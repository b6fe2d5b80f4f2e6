"""Compile every kernel variant the launchers use for a GPU target, without a GPU.

The Triton interpreter runs the kernels' arithmetic on CPU but does not type-check them the way
the compiler does (loop-carried types, constexpr branches, dtype rules of ``tl.math``). This
tool runs the real launchers on small CPU tensors with the kernel launches *recorded* instead of
executed, turns each recorded call into the signature Triton would build at run time (ints equal
to 1 become constants, as Triton specializes them), and compiles it to a cubin for the target
(sm_90, H100, by default) with Triton's bundled ``ptxas``.

Run it in a process without ``TRITON_INTERPRET`` set::

    python tools/triton_compile_check.py [--arch 90] [--quick]

It proves the kernels compile; it cannot say anything about their speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_PTR = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` is recorded."""

    def __init__(self, fn: Any, calls: list) -> None:
        self.fn = fn
        self.calls = calls

    def __getitem__(self, grid: tuple[int, ...]):
        def launch(*args: Any, **kwargs: Any) -> None:
            self.calls.append((self.fn, args, kwargs))

        return launch


@contextmanager
def recording() -> Iterator[list]:
    """Within the block, launchers record kernel calls (into the yielded list) and skip them."""
    from groupnorm.kernels.triton import kernels, launch

    calls: list = []
    saved = {}
    for name in dir(kernels):
        obj = getattr(kernels, name)
        if name.endswith("_kernel") and hasattr(obj, "arg_names"):
            saved[name] = obj
            setattr(kernels, name, _Recorder(obj, calls))
    saved_check = launch.check_device
    launch.check_device = lambda t: None
    try:
        yield calls
    finally:
        for name, obj in saved.items():
            setattr(kernels, name, obj)
        launch.check_device = saved_check


def signature_of(fn: Any, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource`` from a recorded call.

    ``attrs`` marks pointers aligned to 16 bytes and ints divisible by 16, as Triton's runtime
    specialization does; without them the compiler cannot vectorize memory accesses.
    """
    import triton.language as tl

    names = list(fn.arg_names)
    values = dict(zip(names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k in names})
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, name in enumerate(names):
        value = values[name]
        aligned = (
            isinstance(value, torch.Tensor)
            and value.data_ptr() % 16 == 0
            or (type(value) is int and value % 16 == 0)
        )
        if aligned and name not in constexpr_names:
            attrs[(index,)] = [["tt.divisibility", 16]]
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = _PTR[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # Triton specializes ints equal to 1 into constants
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, tl.dtype):
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            raise TypeError(f"cannot type argument {name}={value!r} of {fn.__name__}")
    return signature, constexprs, attrs


def _cases(quick: bool) -> Iterator[tuple[str, dict]]:
    """Launcher calls covering every kernel and the constexpr flags in every dtype."""
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    acts = ["", "silu", "gelu", "relu"]
    for i, dtype in enumerate(dtypes):
        act = acts[i % len(acts)]
        for path in ("fused", "split"):
            yield (
                f"group {path} {dtype} act={act or 'none'} residual",
                dict(
                    shape=(2, 8, 6, 6),
                    dtype=dtype,
                    groups=4,
                    pool=False,
                    act=act,
                    res=True,
                    affine=True,
                    path=path,
                    channels_last=(i % 2 == 1),
                ),
            )
        if quick:
            continue
        yield (
            f"batch {dtype} act={acts[(i + 1) % 4] or 'none'}",
            dict(
                shape=(3, 8, 5, 5),
                dtype=dtype,
                groups=8,
                pool=True,
                act=acts[(i + 1) % 4],
                res=False,
                affine=i % 2 == 0,
                path=None,
                batch_block=2,
                channels_last=True,
            ),
        )
        yield (
            f"batch eval {dtype}",
            dict(
                shape=(3, 8, 5, 5),
                dtype=dtype,
                groups=8,
                pool=True,
                act="",
                res=False,
                affine=True,
                path=None,
                given=True,
                channels_last=False,
            ),
        )
        yield (
            f"group one-tile {dtype} no affine",
            dict(
                shape=(2, 8, 4, 4),
                dtype=dtype,
                groups=2,
                pool=False,
                act=acts[(i + 2) % 4],
                res=False,
                affine=False,
                path="fused",
                block=1024,
                channels_last=False,
            ),
        )


def _record_case(spec: dict) -> list:
    from groupnorm.kernels import Call, GradCall
    from groupnorm.kernels.triton.launch import launch_backward, launch_forward
    from groupnorm.kernels.triton.plan import TritonConfig

    shape, dtype = spec["shape"], spec["dtype"]
    x = torch.randn(shape).to(dtype)
    if spec.get("channels_last"):
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    wdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = torch.randn(c, dtype=wdtype) if spec["affine"] else None
    b = torch.randn(c, dtype=dtype) if spec["affine"] else None
    r = torch.randn(shape).to(dtype) if spec["res"] else None
    given = spec.get("given", False)
    gm = torch.zeros(c) if given else None
    gv = torch.ones(c) if given else None
    cfg = TritonConfig(
        path=spec["path"],
        block=spec.get("block", 16),
        split=2,
        batch_block=spec.get("batch_block"),
        num_sms=132,
    )
    with recording() as calls:
        fake_stats = torch.zeros((c,) if spec["pool"] else (shape[0], spec["groups"]))
        launch_forward(
            Call(x, w, b, r, gm, gv, spec["groups"], spec["pool"], 1e-5, spec["act"]), cfg
        )
        dy = torch.randn(shape).to(dtype)
        groups, pool, act = spec["groups"], spec["pool"], spec["act"]
        grad = GradCall(dy, x, w, b, fake_stats, fake_stats, groups, pool, given, act, (True,) * 3)
        launch_backward(grad, cfg)
    return calls


def vectorized_layouts(arch: int = 90) -> dict[str, bool]:
    """Whether the split-path apply kernels use 128-bit loads and stores, per layout.

    Compiles the forward and backward apply kernels for a float16 (2, 64, 32, 32) input in both
    layouts and looks for ``ld.global.v4`` and ``st.global.v4`` in the PTX: evidence (not a
    measurement) that the tiles run along the unit-stride axis in each layout.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from groupnorm.kernels import Call, GradCall
    from groupnorm.kernels.triton.launch import launch_backward, launch_forward
    from groupnorm.kernels.triton.plan import TritonConfig

    result = {}
    for layout in ("contiguous", "channels_last"):
        x = torch.randn(2, 64, 32, 32).half()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(64), torch.randn(64)
        stats = torch.zeros(2, 32)
        cfg = TritonConfig(path="split", num_sms=132)
        with recording() as calls:
            launch_forward(Call(x, w, b, None, None, None, 32, False, 1e-5, "silu"), cfg)
            grad = GradCall(x, x, w, b, stats, stats, 32, False, False, "silu", (True,) * 3)
            launch_backward(grad, cfg)
        ok = True
        for fn, call_args, kwargs in calls:
            if fn.__name__ not in ("_fwd_apply_kernel", "_bwd_apply_kernel"):
                continue
            signature, constexprs, attrs = signature_of(fn, call_args, kwargs)
            ptx = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": kwargs.get("num_warps", 4)},
            ).asm["ptx"]
            ok = ok and "ld.global.v4" in ptx and "st.global.v4" in ptx
        result[layout] = ok
    return result


#: Realistic shapes with default plans for the register check: (shape, groups, pool, layout).
_SPILL_SHAPES = [
    ((32, 512, 32, 32), 32, False, "contiguous"),  # fused, whole set in one tile
    ((64, 320, 64, 64), 32, False, "contiguous"),  # fused, loop over tiles
    ((2, 320, 64, 64), 32, False, "contiguous"),  # split (SD, few sets)
    ((2, 320, 64, 64), 32, False, "channels_last"),  # split, channel-major tiles
    ((64, 1280, 16, 16), 32, False, "channels_last"),  # fused, channels-last
    ((8, 64, 56, 56), 64, True, "contiguous"),  # batch norm
    ((4096, 512), 512, True, "contiguous"),  # batch norm on rank 2, several samples/program
]


def register_report(arch: int = 90) -> list[tuple[str, str, int, int]]:
    """(case, kernel, registers, spill bytes) from ``ptxas -v`` for default plans of realistic
    shapes in every dtype, with the heaviest variant (residual, gelu, affine)."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from groupnorm.kernels import Call, GradCall
    from groupnorm.kernels.triton.launch import launch_backward, launch_forward
    from groupnorm.kernels.triton.plan import TritonConfig

    ptxas = get_ptxas(arch).path
    cfg = TritonConfig(num_sms=132)
    seen: set = set()
    report = []
    for dtype in (torch.float16, torch.float32, torch.float64):  # bfloat16 compiles like fp16
        for shape, groups, pool, layout in _SPILL_SHAPES:
            x = torch.empty(shape, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            c = shape[1]
            w, b = torch.empty(c), torch.empty(c, dtype=dtype)
            stats = torch.zeros((c,) if pool else (shape[0], groups))
            with recording() as calls:
                launch_forward(
                    Call(x, w, b, torch.empty_like(x), None, None, groups, pool, 1e-5, "gelu"), cfg
                )
                grad = GradCall(x, x, w, b, stats, stats, groups, pool, False, "gelu", (True,) * 3)
                launch_backward(grad, cfg)
            for fn, call_args, kwargs in calls:
                signature, constexprs, attrs = signature_of(fn, call_args, kwargs)
                key = (
                    fn.__name__,
                    repr(sorted(signature.items())),
                    repr(sorted(constexprs.items())),
                )
                if key in seen:
                    continue
                seen.add(key)
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": kwargs.get("num_warps", 4)},
                )
                with tempfile.TemporaryDirectory() as tmp:
                    path = f"{tmp}/k.ptx"
                    with open(path, "w") as fh:
                        fh.write(compiled.asm["ptx"])
                    target = re.search(r"\.target\s+(\w+)", compiled.asm["ptx"]).group(1)
                    out = subprocess.run(
                        [ptxas, f"-arch={target}", "-v", path, "-o", f"{tmp}/k.cubin"],
                        capture_output=True,
                        text=True,
                    )
                text = out.stdout + out.stderr
                regs = re.search(r"Used (\d+) registers", text)
                spills = re.search(r"(\d+) bytes spill stores", text)
                label = f"{'x'.join(map(str, shape))} {layout} {str(dtype)[6:]}"
                report.append(
                    (
                        label,
                        fn.__name__,
                        int(regs.group(1)) if regs else -1,
                        int(spills.group(1)) if spills else -1,
                    )
                )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100)")
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument("--verbose", action="store_true", help="print every register count")
    parser.add_argument(
        "--vector-check",
        action="store_true",
        help="also require 128-bit loads/stores in the apply kernels for both layouts",
    )
    parser.add_argument(
        "--spill-check",
        action="store_true",
        help="also require no register spills (ptxas -v) for default plans of realistic shapes",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the compiler, not the interpreter, is what is checked")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    seen: set = set()
    failures = 0
    start = time.time()
    for label, spec in _cases(args.quick):
        for fn, call_args, kwargs in _record_case(spec):
            signature, constexprs, attrs = signature_of(fn, call_args, kwargs)
            key = (
                fn.__name__,
                tuple(sorted(signature.items())),
                repr(sorted(constexprs.items())),
                repr(sorted(attrs)),
            )
            if key in seen:
                continue
            seen.add(key)
            options = {"num_warps": kwargs.get("num_warps", 4)}
            try:
                triton.compile(
                    ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                    target=target,
                    options=options,
                )
            except Exception as err:  # report every failure, then fail
                failures += 1
                print(f"FAIL {fn.__name__} [{label}]: {type(err).__name__}: {err}")
    print(
        f"compiled {len(seen) - failures}/{len(seen)} kernel variants for sm_{args.arch} "
        f"in {time.time() - start:.1f}s"
    )
    if args.vector_check and not failures:
        for layout, ok in vectorized_layouts(args.arch).items():
            print(f"{layout}: {'128-bit' if ok else 'NOT vectorized'} loads/stores in apply")
            failures += not ok
    if args.spill_check and not failures:
        for label, name, regs, spills in register_report(args.arch):
            bad = spills != 0 or regs < 0
            failures += bad
            if bad or args.verbose:
                print(
                    f"{'SPILL' if bad else 'ok'} {label:32s} {name:22s} regs={regs} spill={spills}"
                )
        print(f"register check: {'spills found' if failures else 'no spills'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
