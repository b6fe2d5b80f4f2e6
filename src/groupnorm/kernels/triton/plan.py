"""How the Triton kernels split a normalization over the GPU: a pure function of the shape.

Nothing here imports Triton or touches a device, so the choice can be unit-tested on any machine.

Two paths (see ``docs/triton.md``):

* ``"fused"``: one program per set (sample, group); it computes the statistics and writes the
  output in the same program. Used when there are enough sets to fill the GPU, or the tensor is
  so small that launch latency is all that matters. When a whole set fits one register tile
  (``one_tile``) the input is read from memory exactly once.
* ``"split"``: a 2-D grid of (channel tile, sample x spatial chunk) programs writes per-channel
  partial statistics to a float32 workspace; an apply kernel on the same grid merges the partials
  of its own sets in a fixed order and normalizes (two launches). Used for few sets (small
  N*G), batch norm (sets pooled over the batch) and channels-last input with few channels per
  group.
* ``"apply"``: batch norm with given statistics (inference): only the apply kernel runs.

Every choice can be forced for tests with a :class:`TritonConfig` or environment variables
(``GROUPNORM_TRITON_PATH``, ``GROUPNORM_TRITON_BLOCK``, ``GROUPNORM_TRITON_SPLIT``,
``GROUPNORM_TRITON_BATCH_BLOCK``, ``GROUPNORM_TRITON_SMS``, ``GROUPNORM_TRITON_POISON``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PATHS = ("fused", "split")

#: Largest tile (elements) one program works on at a time; a power of two.
DEFAULT_BLOCK = 4096
#: A set up to this many (padded) elements is kept in registers and read once.
MAX_ONE_TILE = 8192
#: Up to this many elements in the whole tensor, one launch (the fused path) beats filling the
#: GPU with the split path's three. Measured on an H100 host (2026-11-25, Triton 3.6): a small
#: call costs the host 130-170 us, tens of us of it per extra launch, while the whole split
#: forward of a (1, 320, 16, 16) tensor ran in 7.5 us of GPU time and the fused one in 3.8 us.
SMALL_TENSOR = 1 << 20
#: CUDA's limit on the second grid dimension (channel tiles on the split path).
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class TritonConfig:
    """Overrides for the planner; ``None`` means "let the planner choose".

    Args:
        path: ``"fused"`` or ``"split"`` (for batch norm only ``"split"`` exists).
        block: largest tile in elements (a power of two >= 2); small values force many tiles
            per set, so the loops and masks of every kernel run even on tiny test shapes.
        split: number of chunks each sample's spatial extent is cut into on the split path.
        batch_block: samples each program covers on the batch-norm split path (1 elsewhere).
        num_sms: streaming multiprocessors to plan for (default: the device's, 4 on CPU).
        poison: fill every buffer the launcher allocates (outputs and workspaces) with NaN
            before the kernels run, so that an element no kernel writes shows up in tests.

    Examples:
        >>> TritonConfig(path="split", block=16, split=3).split
        3
    """

    path: str | None = None
    block: int | None = None
    split: int | None = None
    batch_block: int | None = None
    num_sms: int | None = None
    poison: bool = False

    def __post_init__(self) -> None:
        if self.path is not None and self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS} or None, got {self.path!r}")
        if self.block is not None and (self.block < 2 or self.block & (self.block - 1)):
            raise ValueError(f"block must be a power of two >= 2, got {self.block}")
        if self.split is not None and self.split < 1:
            raise ValueError(f"split must be >= 1, got {self.split}")
        if self.batch_block is not None and self.batch_block < 1:
            raise ValueError(f"batch_block must be >= 1, got {self.batch_block}")
        if self.num_sms is not None and self.num_sms < 1:
            raise ValueError(f"num_sms must be >= 1, got {self.num_sms}")


def config_from_env(environ: dict[str, str] | None = None) -> TritonConfig:
    """Read :class:`TritonConfig` overrides from ``GROUPNORM_TRITON_*`` environment variables.

    >>> config_from_env({"GROUPNORM_TRITON_BLOCK": "32", "GROUPNORM_TRITON_PATH": "split"})
    TritonConfig(path='split', block=32, split=None, batch_block=None, num_sms=None, poison=False)
    """
    env = os.environ if environ is None else environ

    def _int(name: str) -> int | None:
        raw = env.get(name, "").strip()
        if not raw:
            return None
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None

    path = env.get("GROUPNORM_TRITON_PATH", "").strip() or None
    poison = env.get("GROUPNORM_TRITON_POISON", "").strip() not in ("", "0")
    return TritonConfig(
        path=path,
        block=_int("GROUPNORM_TRITON_BLOCK"),
        split=_int("GROUPNORM_TRITON_SPLIT"),
        batch_block=_int("GROUPNORM_TRITON_BATCH_BLOCK"),
        num_sms=_int("GROUPNORM_TRITON_SMS"),
        poison=poison,
    )


@dataclass(frozen=True)
class Plan:
    """The launch geometry chosen for one call.

    ``block_c`` x ``block_s`` is the tile (channels x spatial positions). On the split path the
    grid is (ceil(N / ``batch_block``) * ``split``, ``c_tiles``); program (j * split + k, i)
    covers channels [i * block_c, (i + 1) * block_c) of samples
    [j * batch_block, (j + 1) * batch_block) at positions [k * chunk_s, (k + 1) * chunk_s).
    ``batch_block`` > 1 only for batch norm, whose sets span the batch.
    On the fused path the grid is (N * G,) and ``block_c`` covers up to one group's channels.
    """

    path: str
    block_c: int
    block_s: int
    split: int
    chunk_s: int
    c_tiles: int
    one_tile: bool
    num_warps: int
    batch_block: int = 1


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _warps(tile: int) -> int:
    return 4 if tile <= 2048 else (8 if tile <= 8192 else 16)


def _tile(
    channels: int, s: int, channel_contiguous: bool, block: int, c_cap: int | None = None
) -> tuple[int, int]:
    """A power-of-two tile (block_c, block_s) of at most ``block`` elements, long along the axis
    with unit stride so that loads coalesce."""
    c_cap = channels if c_cap is None else c_cap
    if channel_contiguous:
        block_c = min(next_pow2(c_cap), block)
        block_s = max(1, min(next_pow2(s), block // block_c))
    else:
        block_s = min(next_pow2(s), block)
        block_c = max(1, min(next_pow2(c_cap), block // block_s))
    return block_c, block_s


def make_plan(
    n: int,
    c: int,
    s: int,
    num_groups: int,
    pool_batch: bool,
    stats_given: bool,
    channel_contiguous: bool,
    config: TritonConfig | None = None,
    *,
    backward: bool = False,
    wide: bool = False,
) -> Plan:
    """Choose fused/split/apply and the tile and split sizes for an (N, C, S) problem.

    Args:
        n, c, s: batch size, channels, product of the spatial sizes (all >= 1).
        num_groups: G (C for instance and batch norm, 1 for layer norm).
        pool_batch: batch norm (one set per channel, pooled over the batch).
        stats_given: batch norm at inference (statistics are inputs; only apply runs).
        channel_contiguous: the channel stride is 1 (channels-last, or rank-2 input).
        config: overrides (see :class:`TritonConfig`).
        backward: plan the backward, which holds x, dy and their products per element: half the
            default tile, and never a whole set in registers.
        wide: 8-byte accumulators (float64 input): half the default tile and one-tile limit.

    The default tile sizes keep the kernels free of register spills on sm_90, as checked by
    ``ptxas -v`` on the compiled kernels (no GPU run).

    Examples:
        >>> h100 = TritonConfig(num_sms=132)
        >>> make_plan(1, 320, 64 * 64, 32, False, False, False, h100).path  # 32 sets: split
        'split'
        >>> make_plan(64, 320, 16 * 16, 32, False, False, False, h100).path  # 2048 sets
        'fused'
        >>> make_plan(8, 64, 100, 64, True, True, False).path
        'apply'
    """
    config = config or TritonConfig()
    block = config.block or DEFAULT_BLOCK // (2 if backward else 1) // (2 if wide else 1)
    max_one_tile = 0 if backward else MAX_ONE_TILE // (2 if wide else 1)
    num_sms = config.num_sms or 4
    cg = c // num_groups
    sets = num_groups if pool_batch else n * num_groups
    target = 4 * num_sms  # programs wanted in flight for a bandwidth-bound kernel

    if stats_given:
        path = "apply"
    elif pool_batch:
        path = "split"
    elif config.path is not None:
        path = config.path
    elif n * c * s <= SMALL_TENSOR:
        path = "fused"
    elif channel_contiguous and cg < 8:
        # A set is a column of cg channels with stride C: tiles across groups coalesce better.
        path = "split"
    else:
        path = "fused" if sets >= 2 * num_sms else "split"

    if path == "fused":
        block_c, block_s = _tile(c, s, channel_contiguous, block, c_cap=cg)
        padded = next_pow2(cg) * next_pow2(s)
        one_tile = padded <= min(block if config.block else max_one_tile, max_one_tile)
        if one_tile:
            block_c, block_s = next_pow2(cg), next_pow2(s)
        tile = block_c * block_s
        return Plan("fused", block_c, block_s, 1, s, 1, one_tile, _warps(tile))

    if wide and not backward and config.block is None:
        # The split forward's apply keeps per-channel shift, mean and rstd beside its tile; with
        # 8-byte values a channels-last tile of the default size spilled on sm_90 (ptxas -v).
        block //= 2
    block_c, block_s = _tile(c, s, channel_contiguous, block)
    while _cdiv(c, block_c) > MAX_GRID_Y and block_s > 1:  # CUDA caps grid dim 1 at 65535
        block_c, block_s = 2 * block_c, block_s // 2
    if _cdiv(c, block_c) > MAX_GRID_Y:
        raise ValueError(f"{c} channels need more than {MAX_GRID_Y} channel tiles; not supported")
    while True:
        geometry = _split_geometry(
            n, c, s, cg, pool_batch, stats_given, config, block, block_c, block_s, target
        )
        c_tiles, split, batch_block = geometry[0], geometry[1], geometry[3]
        programs = _cdiv(n, batch_block) * split * c_tiles
        # Channels-last tiles run along C; when the limit on re-read partials leaves too few
        # programs, narrower channel tiles give more of them.
        if programs >= target or not channel_contiguous or block_c <= 16:
            break
        block_c, block_s = block_c // 2, min(block_s * 2, next_pow2(s))
    c_tiles, split, chunk_s, batch_block = geometry
    tile = block_c * block_s
    warps = _warps(tile)
    if wide and not backward:
        warps = max(warps, 8)  # the same reason: fewer 8-byte values per thread
    return Plan(path, block_c, block_s, split, chunk_s, c_tiles, False, warps, batch_block)


def fold_reads(
    n: int, c: int, cg: int, pool_batch: bool, block_c: int, c_tiles: int, rows: int
) -> int:
    """Workspace entries the apply programs read in all to merge the statistics of their sets.

    Each apply program reduces the partials of the sets its channels belong to: with one set per
    channel (batch norm) all ``rows`` rows of its ``block_c`` channels; otherwise the ``split``
    rows of its sample for every channel of the sets its tile touches (at most block_c + cg).

    >>> fold_reads(1, 320, 10, False, 1, 320, 1)  # SD 1x320x64x64, contiguous: 11 a program
    3520
    """
    if pool_batch:
        return rows * c_tiles * rows * block_c
    split = rows // n
    return rows * c_tiles * split * (block_c + (cg if cg > 1 else 0))


def _split_geometry(n, c, s, cg, pool_batch, stats_given, config, block, block_c, block_s, target):
    """(c_tiles, split, chunk_s, batch_block) of the split path for a given tile.

    Unless forced, ``split`` and ``batch_block`` aim at ``target`` programs, and then are cut
    back until the apply programs' re-reads of the two partial buffers (:func:`fold_reads`)
    stay within the tensor's element count."""
    c_tiles = _cdiv(c, block_c)
    s_blocks = _cdiv(s, block_s)
    if config.split is not None:
        split = min(config.split, s_blocks)
    else:
        split = min(s_blocks, max(1, _cdiv(target, c_tiles * n)))
    batch_block = 1
    if pool_batch:
        if config.batch_block is not None:
            batch_block = min(config.batch_block, n)
        else:
            # Several samples per program when one sample gives it little work (small S, e.g.
            # rank-2 input), so the workspace stays small; but keep enough programs.
            per_sample = block_c * min(_cdiv(s_blocks, split) * block_s, s)
            want = _cdiv(4 * block, per_sample)
            spare = max(1, (c_tiles * n * split) // target)
            batch_block = max(1, min(n, want, spare))
    if not stats_given:
        budget = n * c * s

        def reads(split: int, batch_block: int) -> int:
            rows = _cdiv(n, batch_block) * split
            return 2 * fold_reads(n, c, cg, pool_batch, block_c, c_tiles, rows)

        while config.split is None and split > 1 and reads(split, batch_block) > budget:
            split = max(1, split // 2)
        while (
            pool_batch
            and config.batch_block is None
            and batch_block < n
            and reads(split, batch_block) > budget
        ):
            batch_block = min(n, 2 * batch_block)
    chunk_s = _cdiv(s_blocks, split) * block_s
    split = _cdiv(s, chunk_s)
    return c_tiles, split, chunk_s, batch_block


def element_offset(n: int, c: int, s: int, stride_n: int, stride_c: int, stride_s: int) -> int:
    """Offset of element (n, c, s) in elements: the arithmetic the kernels do in int64.

    Python integers never overflow, so this is the ground truth tests compare the kernels'
    offset helper against for tensors with more than 2**31 elements.

    >>> element_offset(3, 0, 0, 2**30, 1, 1) > 2**31
    True
    """
    return n * stride_n + c * stride_c + s * stride_s
