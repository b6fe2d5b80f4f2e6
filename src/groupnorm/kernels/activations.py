"""The one table of the activations the kernels fuse: :data:`FUSED`.

Each :class:`FusedActivation` record holds what the Python side needs about one activation the
kernels compute inside the norm: its name and the other names ``activation=`` takes for it, the
integer code the C++ extension and the Triton kernels branch on, the torch function computing
it (the portable core, the exporter, the converters' checks), the tensor functions and the
``nn.Module`` class that mean it when given as ``act_layer``, and its derivative for the portable
backward. Every other table of names, codes or functions in the package is derived from this
one (:data:`BY_NAME`, :data:`CODES`, :data:`ACTIVATION_NAMES`; ``groupnorm._act`` reads it for
modules). The formulas the compiled kernels run stay in their sources
(``cpu_ext/gn_common.h``, ``triton/kernels.py``), and the float64 reference
(``groupnorm.reference``) writes them again from their definitions, to test them against.

It lives here, below every other layer, so that the backends can read it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _silu_grad(z: Tensor) -> Tensor:
    sig = torch.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


def _gelu_grad(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(z * _SQRT_HALF)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _relu_grad(z: Tensor) -> Tensor:
    return (z > 0).to(z.dtype)


def _any_instance(module: nn.Module) -> bool:
    return True


@dataclass(frozen=True)
class FusedActivation:
    """One activation the kernels compute inside the norm.

    Attributes:
        name: the canonical name (``NormSpec.activation``, ``extra_repr``, factory names).
        code: the integer the C++ extension and the Triton kernels branch on (0 is none); the
            C++ enum in ``gn_common.h`` holds the same numbers.
        aliases: other names ``activation=`` takes for it.
        function: the torch function computing it (the portable core, the exporter).
        functions: the tensor functions that mean it when given as ``act_layer``.
        module: the ``nn.Module`` class computing it; an instance of exactly this type fuses...
        exact: ...when this test on the instance holds too.
        grad: f'(z), for the portable backward (which recomputes it from z).
    """

    name: str
    code: int
    aliases: tuple[str, ...]
    function: Callable[[Tensor], Tensor]
    functions: tuple[Callable[..., Tensor], ...]
    module: type[nn.Module]
    exact: Callable[[nn.Module], bool]
    grad: Callable[[Tensor], Tensor]


#: The fused activations, in the order messages list them.
FUSED: tuple[FusedActivation, ...] = (
    FusedActivation(
        name="silu",
        code=1,
        aliases=("swish",),
        function=torch.nn.functional.silu,
        functions=(torch.nn.functional.silu,),
        module=nn.SiLU,
        exact=_any_instance,
        grad=_silu_grad,
    ),
    FusedActivation(
        name="gelu",  # the exact (erf) form, torch's default
        code=2,
        aliases=(),
        function=torch.nn.functional.gelu,
        functions=(torch.nn.functional.gelu,),
        module=nn.GELU,
        exact=lambda m: m.approximate == "none",
        grad=_gelu_grad,
    ),
    FusedActivation(
        name="relu",
        code=3,
        aliases=(),
        function=torch.relu,
        functions=(torch.nn.functional.relu, torch.relu),
        module=nn.ReLU,
        exact=_any_instance,
        grad=_relu_grad,
    ),
)

#: canonical name -> record
BY_NAME: dict[str, FusedActivation] = {a.name: a for a in FUSED}
#: canonical name -> kernel code, ``""`` (none) -> 0
CODES: dict[str, int] = {"": 0, **{a.name: a.code for a in FUSED}}
#: every spelling ``activation=`` takes -> canonical name (``""`` for none)
ACTIVATION_NAMES: dict[str | None, str] = {
    None: "",
    "": "",
    "none": "",
    "identity": "",
    **{n: a.name for a in FUSED for n in (a.name, *a.aliases)},
}
