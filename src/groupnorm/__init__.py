"""groupnorm: Batch, Layer, Instance and Group Normalization from one core.

Implements the normalization family of *Group Normalization* (Wu & He, ECCV 2018): every mode
normalizes each element by the mean and biased standard deviation of a set of elements, and
only the set differs. See ``docs/architecture.md`` for the layers.
"""

from . import ops as _ops  # noqa: F401  (registers the custom ops)
from .convert import convert_batchnorm, replace_group_norm
from .factory import create_norm_layer, get_norm_layer
from .functional import batch_norm, group_norm, instance_norm, layer_norm, normalize
from .modules import BatchNorm, GroupNorm, GroupNormAct, InstanceNorm, LayerNorm
from .reference import reference_norm
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from .weight_standardization import WSConv1d, WSConv2d, WSConv3d, standardize_weight

__version__ = "0.1.0"

__all__ = [
    "normalize",
    "group_norm",
    "batch_norm",
    "layer_norm",
    "instance_norm",
    "GroupNorm",
    "GroupNormAct",
    "BatchNorm",
    "SyncBatchNorm",
    "LayerNorm",
    "InstanceNorm",
    "reference_norm",
    "convert_batchnorm",
    "replace_group_norm",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "create_norm_layer",
    "get_norm_layer",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "standardize_weight",
]
