r"""Weight Standardization: convolutions whose filters are standardized before use.

Weight Standardization (Qiao et al., 2019) is the usual companion of group norm when training
without batch statistics, e.g. in Big Transfer (Kolesnikov et al., 2020): each output filter
:math:`W_o` (all of its ``in_channels / groups * prod(kernel_size)`` fan-in weights) is replaced by

.. math::
    \hat W_o = \frac{W_o - \mathrm{mean}(W_o)}{\sqrt{\mathrm{var}(W_o) + \epsilon}}

with the biased variance, on every forward; gradients flow through the standardization. The
stored parameter stays the raw ``weight``, so state_dicts match ``torch.nn.Conv*d``.

Examples:
    >>> conv = WSConv2d(3, 8, 3, padding=1)
    >>> conv(torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
    >>> w = standardize_weight(conv.weight)
    >>> torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(8), atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._validation import check_eps

__all__ = ["standardize_weight", "WSConv1d", "WSConv2d", "WSConv3d"]

#: Default epsilon added to each filter's variance.
DEFAULT_EPS = 1e-6


def standardize_weight(weight: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Standardize each filter ``weight[o]`` over its fan-in (all dims but 0).

    Statistics are computed in float32 for float16/bfloat16 weights (float64 stays float64); the
    result has the weight's dtype.

    Args:
        weight: a convolution weight (out_channels, in_channels / groups, \\*kernel_size).
        eps: added to the biased variance of each filter.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(
            f"weight must have shape (out_channels, fan_in...), got shape {tuple(weight.shape)}"
        )
    eps = check_eps(eps)
    work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    dims = tuple(range(1, work.dim()))
    var, mean = torch.var_mean(work, dim=dims, keepdim=True, correction=0)
    return ((work - mean) * torch.rsqrt(var + eps)).to(weight.dtype)


class _WSConvNd:
    """Shared part of WSConv1d/2d/3d: a keyword ``eps`` and a forward on the standardized weight.

    Placed before ``nn.ConvNd`` in the bases, so everything else (arguments, state_dict,
    ``isinstance(m, nn.Conv2d)``) is the torch convolution's.
    """

    weight: Tensor
    bias: Tensor | None

    def __init__(self, *args: Any, eps: float = DEFAULT_EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ws_eps = check_eps(eps)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, standardize_weight(self.weight, self.ws_eps), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ws_eps={self.ws_eps}"

    @classmethod
    def from_conv(cls, conv: nn.Module, eps: float = DEFAULT_EPS) -> nn.Module:
        """A weight-standardized copy of ``conv`` that shares its ``weight``/``bias`` Parameters.

        Sharing (not copying) the Parameters keeps optimizers that already hold them valid.
        """
        base = cls.__mro__[2]  # nn.Conv1d / nn.Conv2d / nn.Conv3d
        if not isinstance(conv, base):
            raise TypeError(f"{cls.__name__}.from_conv needs a {base.__name__}, got {type(conv)}")
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            eps=eps,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new


class WSConv1d(_WSConvNd, nn.Conv1d):
    """``torch.nn.Conv1d`` with Weight Standardization; extra keyword ``eps`` (default 1e-6).

    >>> WSConv1d(4, 6, 3)(torch.randn(2, 4, 10)).shape
    torch.Size([2, 6, 8])
    """


class WSConv2d(_WSConvNd, nn.Conv2d):
    """``torch.nn.Conv2d`` with Weight Standardization; extra keyword ``eps`` (default 1e-6).

    >>> WSConv2d(4, 6, 3, bias=False)
    WSConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), bias=False, ws_eps=1e-06)
    """


class WSConv3d(_WSConvNd, nn.Conv3d):
    """``torch.nn.Conv3d`` with Weight Standardization; extra keyword ``eps`` (default 1e-6).

    >>> WSConv3d(2, 4, 3, padding=1)(torch.randn(1, 2, 4, 4, 4)).shape
    torch.Size([1, 4, 4, 4, 4])
    """
