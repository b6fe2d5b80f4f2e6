"""One kernel launch of a plan, and the cheap way to repeat it: the compiled launcher.

``kernel[grid](*args, **constexprs)`` goes through Triton's ``JITFunction.run`` on every call:
binding ~30 arguments, computing their specialization, hashing a cache key, building launch
metadata; tens of microseconds of host time for a kernel that may run for a few. A
:class:`Launch` does that once: its first call goes through ``kernel[grid]`` (compiling if
needed) and keeps the :class:`CompiledKernel` Triton returns; later calls with arguments of the
same specialization call ``compiled.run(...)`` directly, the launcher ``JITFunction.run`` itself
ends in.

The direct call depends on Triton internals (the launcher's argument order, the hook objects), so
it is only taken where they are known (:func:`direct_launch_declined` says why not otherwise):
a real ``JITFunction`` (not the interpreter), a Triton version whose compiled launcher takes
``(grid x3, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args)``
with every argument including the constexprs, no launch hooks installed (profilers), and
``GROUPNORM_TRITON_LAUNCH`` not ``jit``. Otherwise every call is ``kernel[grid](...)``, which is
always correct.

What makes a compiled kernel reusable: the launchers plan one :class:`Launch` per (shape,
strides, dtypes, flags), so every integer argument is the same on every call; the float
arguments are not specialized; what can still differ is whether a tensor's address is a
multiple of 16 (Triton compiles separate variants), so the compiled kernels are kept per
alignment pattern of the tensor arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: Triton versions (major, minor) whose ``CompiledKernel.run`` takes every argument of the
#: kernel (constexprs included) after the nine launch arguments, and whose launch hooks live on
#: ``triton.knobs.runtime``. Checked against Triton 3.9's ``JITFunction.run``.
KNOWN_TRITON = ((3, 4), (3, 9))


def _version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def direct_launch_declined(fn: Any, launch_mode: str, interpret: bool) -> str | None:
    """Why ``fn`` cannot be launched through its compiled launcher, or None when it can."""
    if launch_mode != "direct":
        return "GROUPNORM_TRITON_LAUNCH=jit"
    if interpret:
        return "the Triton interpreter runs the kernels"
    try:
        import triton
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover - the kernels import triton first
        return "triton is not importable"
    if not isinstance(fn, JITFunction):
        return f"{type(fn).__name__} is not a triton JITFunction"
    low, high = KNOWN_TRITON
    if not low <= _version(triton.__version__) <= high:
        return f"triton {triton.__version__}: its compiled launcher's arguments are not known"
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "launch_enter_hook"):
        return "triton.knobs.runtime.launch_enter_hook is missing"
    params = list(getattr(fn, "params", ()))
    flags = [bool(getattr(p, "is_constexpr", False)) for p in params]
    if not params or flags != sorted(flags):  # constexprs must all come last
        return "the kernel's constexpr parameters are not its last ones"
    return None


def _hooks_installed() -> bool:
    """Whether a profiler installed Triton launch hooks (then the JIT path runs them)."""
    import triton

    runtime = triton.knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _current_stream() -> Any:
    from triton.runtime import driver

    active = driver.active
    return active.get_current_stream(active.get_current_device())


class Launch:
    """A kernel with a fixed grid and fixed compile-time arguments; ``launch(*args)`` runs it.

    Args:
        kernel: the ``@triton.jit`` function, or a zero-argument callable returning it (looked up
            on every JIT-path call, so a test can swap the module attribute).
        grid: the launch grid (1 to 3 ints; padded to 3 with ones).
        options: constexpr arguments by name, plus launch options such as ``num_warps``.
        direct: try the compiled launcher (see :func:`direct_launch_declined`); False forces the
            JIT path.
        stream: returns the stream to launch on (default: Triton's current stream).
        hooks_installed: returns whether launch hooks are active (default: Triton's knobs).

    Examples:
        >>> calls = []
        >>> class Kernel:  # stands in for a JITFunction
        ...     def __getitem__(self, grid):
        ...         return lambda *a, **kw: calls.append((grid, a, kw))
        >>> Launch(Kernel(), (2, 3), {"BLOCK": 16}, direct=False)(1.5, 7)
        >>> calls
        [((2, 3, 1), (1.5, 7), {'BLOCK': 16})]
    """

    __slots__ = (
        "_kernel",
        "grid",
        "options",
        "direct",
        "_constexprs",
        "_tensor_slots",
        "_handles",
        "_stream",
        "_hooks",
    )

    def __init__(
        self,
        kernel: Any,
        grid: tuple[int, ...],
        options: dict[str, Any],
        direct: bool,
        stream: Callable[[], Any] | None = None,
        hooks_installed: Callable[[], bool] | None = None,
    ) -> None:
        self._kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.options = options
        self.direct = direct
        self._constexprs: tuple | None = None
        self._tensor_slots: tuple[int, ...] | None = None
        self._handles: dict[int, Any] = {}
        self._stream = stream or _current_stream
        self._hooks = hooks_installed or _hooks_installed

    def kernel(self) -> Any:
        k = self._kernel
        return k() if callable(k) and not hasattr(k, "__getitem__") else k

    def _alignment(self, args: tuple) -> int:
        key = 0
        for i in self._tensor_slots:
            key = 2 * key + (args[i].data_ptr() % 16 == 0)
        return key

    def __call__(self, *args: Any) -> None:
        if self.direct and self._tensor_slots is not None:
            handle = self._handles.get(self._alignment(args))
            if handle is not None and not self._hooks():
                g0, g1, g2 = self.grid
                try:
                    handle.run(
                        g0,
                        g1,
                        g2,
                        self._stream(),
                        handle.function,
                        handle.packed_metadata,
                        None,
                        None,
                        None,
                        *args,
                        *self._constexprs,
                    )
                    return
                except (TypeError, ValueError, SystemError):
                    # The launcher rejected the arguments before launching: this Triton's
                    # launcher differs from the one described above. JIT path from now on.
                    self.direct = False
        fn = self.kernel()
        compiled = fn[self.grid](*args, **self.options)
        if self.direct:
            self._remember(fn, args, compiled)

    def wrapped(self, *args: Any) -> None:
        """The same launch recorded for ``torch.compile``: through ``torch.library.wrap_triton``
        (inside a ``triton_op``), so the graph holds the kernel itself."""
        from torch.library import wrap_triton

        wrap_triton(self.kernel())[self.grid](*args, **self.options)

    def _remember(self, fn: Any, args: tuple, compiled: Any) -> None:
        """Keep the compiled kernel of this first launch for the direct path, or give it up."""
        if compiled is not None and hasattr(compiled, "result"):  # an asynchronous compile
            compiled = compiled.result()
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            self.direct = False
            return
        if self._tensor_slots is None:
            names = [p.name for p in fn.params if p.is_constexpr]
            if any(name not in self.options for name in names) or len(args) + len(names) != len(
                fn.params
            ):
                self.direct = False  # arguments not all given positionally then by name
                return
            self._constexprs = tuple(self.options[name] for name in names)
            self._tensor_slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        self._handles[self._alignment(args)] = compiled
