r"""Triton kernels for the one normalization core (imported only when the backend is used).

Every tensor is addressed as (N, C, S): element (n, c, s) lives at
``n * stride_n + c * stride_c + s * stride_s`` with the spatial dims collapsed into one stride,
which covers contiguous (``stride_s == 1``) and channels-last (``stride_c == 1``) input of any
rank without a copy. All offsets are computed in int64 by :func:`_row_offsets` and
:func:`_tile_offsets`.

Forward, for a set with ``shift`` = its first element (a value of the data, so ``v - shift`` is
small and exact when the mean is large against the spread):

* per tile: ``d = v - shift``, ``bmean = sum(d) / nb``, ``bm2 = sum((d - bmean)**2)``;
* tiles merged with Chan's rule: ``delta = bmean - mean``, ``mean += delta * nb / tot``,
  ``m2 += bm2 + delta**2 * seen * nb / tot``;
* ``mean = shift + mean_d`` (returned), ``rstd = 1 / sqrt(m2 / set_size + eps)``;
* ``xhat = ((v - shift) - mean_d) * rstd``, ``z = xhat * w + b``, ``y = act(z)``: the forward
  applies the shifted form, so a set whose mean is large against its spread keeps the digits a
  rounded ``mean`` would lose (float32 input with mean 1e4 and std 1e-3).

On the split path the per-set merge of the partial statistics (and, in the backward, of the
partial gradient sums) is done by each apply program for the sets of its own channels, so the
forward is two launches (partial, apply) and the backward three (partial, apply, column sums).

Backward, with ``dz = dy * act'(z)`` (``act'`` recomputed from x), per channel
``pdb = sum(dz)``, ``pdw = sum(dz * xhat)`` (the dbias/dweight partials), and per set
``c1 = sum(w * pdb) / set_size``, ``c2 = sum(w * pdw) / set_size``:
``dx = (w * dz - c1 - xhat * c2) * rstd``, or ``dx = w * dz * rstd`` when the statistics were
given (batch norm at inference). dweight and dbias are the column sums of the per-program
partial buffers, taken in a fixed order by :func:`_column_sum_kernel`: no atomics, bit-for-bit
deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..activations import CODES

#: Activation name -> the compile-time code the kernels branch on (from the activation table).
ACTIVATION_CODES = CODES
_SILU = tl.constexpr(CODES["silu"])
_GELU = tl.constexpr(CODES["gelu"])
_RELU = tl.constexpr(CODES["relu"])

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(n, c, stride_n, stride_c):
    """int64 offsets of (n, c, s=0); int32 indices times strides would overflow past 2**31."""
    return tl.cast(n, tl.int64) * stride_n + tl.cast(c, tl.int64) * stride_c


@triton.jit
def _tile_offsets(rows, s, stride_s):
    """int64 offsets of a [rows, positions] tile from row offsets and spatial indices."""
    return rows[:, None] + s.to(tl.int64)[None, :] * stride_s


@triton.jit
def _load_value(X, R, x_offs, r_offs, mask, HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """x (or x + r rounded to the input dtype, as torch's add would) in the input dtype."""
    x = tl.load(X + x_offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + r_offs, mask=mask, other=0.0)
        x = (x.to(ACC) + r.to(ACC)).to(X.dtype.element_ty)
    return x


@triton.jit
def _inv_std(var, eps, ACC: tl.constexpr):
    """1 / sqrt(var + eps) with a correctly rounded square root (fp64 sqrt always is)."""
    if ACC == tl.float64:
        root = tl.sqrt(var + eps)
    else:
        root = tl.sqrt_rn(var + eps)
    return 1.0 / root


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == _SILU:
        z = z / (1.0 + tl.exp(-z))
    elif ACTIVATION == _GELU:  # exact erf form
        z = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT_HALF))
    elif ACTIVATION == _RELU:
        z = tl.where(z > 0.0, z, 0.0)
    return z


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """f'(z) for the fused activation (only called when ACTIVATION != 0)."""
    if ACTIVATION == _SILU:
        sig = 1.0 / (1.0 + tl.exp(-z))
        grad = sig * (1.0 + z * (1.0 - sig))
    elif ACTIVATION == _GELU:
        grad = 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    else:  # _RELU
        grad = tl.where(z > 0.0, 1.0, 0.0).to(z.dtype)
    return grad


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_partial_kernel(
    X,  # (N, C, S) input, strided
    R,  # (N, C, S) residual (unused unless HAS_RESIDUAL)
    PMEAN,  # (rows, C) workspace: mean of (v - shift) over the program's chunk, per channel
    PM2,  # (rows, C) workspace: sum of squared deviations over the chunk, per channel
    m2_at,  # offset of PM2 from the pointer passed (both halves of one buffer)
    N,  # samples
    C,  # channels
    S,  # spatial positions per (n, c)
    Cg,  # channels per set (1 for batch norm)
    batch_block,  # samples per program (1 unless batch norm)
    chunk_s,  # positions per chunk
    split,  # chunks per sample
    sxn,  # x strides (n, c, s)
    sxc,
    sxs,
    srn,  # residual strides (n, c, s)
    src,
    srs,
    HAS_RESIDUAL: tl.constexpr,
    POOL: tl.constexpr,  # batch norm: the shift comes from sample 0
    ACC: tl.constexpr,  # accumulation dtype (float32, or float64 for float64 input)
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    PM2 = PM2 + m2_at
    # Program (pid_r, pid_c): samples [n_lo, n_hi) x positions [s_lo, s_hi) x BLOCK_C channels.
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    nb_id = pid_r // split
    k = pid_r - nb_id * split
    n_lo = nb_id * batch_block
    n_hi = tl.minimum(n_lo + batch_block, N)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    first_c = (c // Cg) * Cg
    if POOL:
        n_shift = n_lo * 0
    else:
        n_shift = n_lo
    shift = _load_value(
        X,
        R,
        _row_offsets(n_shift, first_c, sxn, sxc),
        _row_offsets(n_shift, first_c, srn, src),
        cmask,
        HAS_RESIDUAL,
        ACC,
    ).to(ACC)
    s_lo = k * chunk_s
    s_hi = tl.minimum(s_lo + chunk_s, S)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for n in range(n_lo, n_hi):
        x_rows = _row_offsets(n, c, sxn, sxc)
        r_rows = _row_offsets(n, c, srn, src)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_hi)[None, :]
            v = _load_value(
                X,
                R,
                _tile_offsets(x_rows, s, sxs),
                _tile_offsets(r_rows, s, srs),
                mask,
                HAS_RESIDUAL,
                ACC,
            ).to(ACC)
            d = tl.where(mask, v - shift[:, None], 0.0)
            nb = (tl.minimum(s0 + BLOCK_S, s_hi) - s0).to(ACC)
            seen = ((n - n_lo) * (s_hi - s_lo) + (s0 - s_lo)).to(ACC)
            bmean = tl.sum(d, axis=1) / nb
            dc = tl.where(mask, d - bmean[:, None], 0.0)
            bm2 = tl.sum(dc * dc, axis=1)
            tot = seen + nb
            delta = bmean - mean
            mean += delta * (nb / tot)
            m2 += bm2 + delta * delta * (seen * nb / tot)
    ws = pid_r.to(tl.int64) * C + c
    tl.store(PMEAN + ws, mean, mask=cmask)
    tl.store(PM2 + ws, m2, mask=cmask)


@triton.jit
def _entry_count(a, N, S, batch_block, chunk_s, split, ACC: tl.constexpr):
    """Elements behind workspace row ``a`` of one channel: samples of its block x chunk length."""
    nb = a // split
    samples = tl.minimum(batch_block, N - nb * batch_block)
    return (samples * tl.minimum(chunk_s, S - (a - nb * split) * chunk_s)).to(ACC)


@triton.jit
def _channel_stats(
    PMEAN,
    PM2,
    c,
    cmask,
    row_lo,
    row_hi,
    N,
    C,
    S,
    batch_block,
    chunk_s,
    split,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(mean of v - shift, M2) per channel of ``c`` over workspace rows [row_lo, row_hi): the
    sets of batch norm and instance norm are single channels, so a tile's channels are its sets.
    Rows are merged one by one with Chan's rule, in a fixed order."""
    cnt = tl.zeros([BLOCK], ACC)
    mean = tl.zeros([BLOCK], ACC)
    m2 = tl.zeros([BLOCK], ACC)
    for a in range(row_lo, row_hi):
        offs = tl.cast(a, tl.int64) * C + c
        pm = tl.load(PMEAN + offs, mask=cmask, other=0.0)
        pm2 = tl.load(PM2 + offs, mask=cmask, other=0.0)
        na = _entry_count(a, N, S, batch_block, chunk_s, split, ACC)
        tot = cnt + na
        frac = na / tot
        delta = pm - mean
        mean += delta * frac
        m2 += pm2 + delta * delta * cnt * frac
        cnt = tot
    return mean, m2


@triton.jit
def _group_stats(
    PMEAN,
    PM2,
    n,
    c0,
    C,
    S,
    Cg,
    chunk_s,
    split,
    set_size,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(mean of v - shift, variance) of set (n, channels c0..c0+Cg) from the partials of its
    ``split`` workspace rows: a sum over the entries, then the deviations from that mean."""
    base = tl.cast(n, tl.int64) * split * C + c0
    entries = split * Cg
    acc = tl.zeros([BLOCK], ACC)
    for j0 in range(0, entries, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < entries
        a = j // Cg
        cnt = tl.minimum(chunk_s, S - a * chunk_s).to(ACC)
        pm = tl.load(PMEAN + base + a.to(tl.int64) * C + (j - a * Cg), mask=m, other=0.0)
        acc += tl.where(m, cnt * pm, 0.0)
    mean_d = tl.sum(acc, axis=0) / set_size
    acc = tl.zeros([BLOCK], ACC)
    for j0 in range(0, entries, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < entries
        a = j // Cg
        cnt = tl.minimum(chunk_s, S - a * chunk_s).to(ACC)
        offs = base + a.to(tl.int64) * C + (j - a * Cg)
        pm = tl.load(PMEAN + offs, mask=m, other=0.0)
        pm2 = tl.load(PM2 + offs, mask=m, other=0.0)
        dm = pm - mean_d
        acc += tl.where(m, pm2 + cnt * dm * dm, 0.0)
    return mean_d, tl.sum(acc, axis=0) / set_size


@triton.jit
def _fwd_apply_kernel(
    X,  # (N, C, S) input
    R,  # residual
    Y,  # (N, C, S) out: output
    SUM,  # (N, C, S) out: x + residual (written only if HAS_RESIDUAL)
    W,  # (C,) weight
    B,  # (C,) bias
    PMEAN,  # (rows, C) partial shifted means (STATS_GIVEN: the given mean, (C,))
    PM2,  # (rows, C) partial M2 (STATS_GIVEN: the given variance, (C,))
    m2_at,  # offset of PM2 from the pointer passed (both halves of one buffer; 0 if given)
    MEAN,  # (N, G) or (C,) out: mean, written once per set
    RSTD,  # out: 1 / sqrt(var + eps)
    eps,
    set_size,  # elements per set, as a float
    N,
    C,
    S,
    G,
    Cg,
    batch_block,
    chunk_s,
    split,
    sxn,
    sxc,
    sxs,
    srn,
    src,
    srs,
    syn,
    syc,
    sys,
    stn,
    stc,
    sts,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    POOL: tl.constexpr,
    STATS_GIVEN: tl.constexpr,  # batch norm at inference: statistics are inputs
    PER_CHANNEL: tl.constexpr,  # every set is one channel (batch norm, or Cg == 1)
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_F: tl.constexpr,  # entries merged at a time when a set spans several channels
):
    PM2 = PM2 + m2_at
    # Each program first reduces the partials of the sets its channels belong to (the work of a
    # separate finalize launch, repeated by every program of a set: the workspace is small),
    # then normalizes its tile as ((v - shift) - mean_d) * rstd, which keeps the digits of v
    # that a float mean of a far-from-zero set would round away.
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    nb_id = pid_r // split
    k = pid_r - nb_id * split
    n_lo = nb_id * batch_block
    n_hi = tl.minimum(n_lo + batch_block, N)
    c_lo = pid_c * BLOCK_C
    c = c_lo + tl.arange(0, BLOCK_C)
    cmask = c < C
    if HAS_WEIGHT:
        w = tl.load(W + c, mask=cmask, other=0.0).to(ACC)
    if HAS_BIAS:
        b = tl.load(B + c, mask=cmask, other=0.0).to(ACC)
    if STATS_GIVEN:
        shift = tl.zeros([BLOCK_C], ACC)
        mean_d = tl.load(PMEAN + c, mask=cmask, other=0.0).to(ACC)
        var = tl.load(PM2 + c, mask=cmask, other=1.0).to(ACC)
        rstd = _inv_std(var, eps, ACC)
        if pid_r == 0:
            tl.store(MEAN + c, mean_d, mask=cmask)
            tl.store(RSTD + c, rstd, mask=cmask)
    elif POOL:
        n0 = pid_r * 0  # the shift of a batch-norm set comes from sample 0
        shift = _load_value(
            X,
            R,
            _row_offsets(n0, c, sxn, sxc),
            _row_offsets(n0, c, srn, src),
            cmask,
            HAS_RESIDUAL,
            ACC,
        ).to(ACC)
        rows = tl.cdiv(N, batch_block) * split
        mean_d, m2 = _channel_stats(
            PMEAN, PM2, c, cmask, 0, rows, N, C, S, batch_block, chunk_s, split, ACC, BLOCK_C
        )
        rstd = _inv_std(m2 / set_size, eps, ACC)
        if pid_r == 0:
            tl.store(MEAN + c, shift + mean_d, mask=cmask)
            tl.store(RSTD + c, rstd, mask=cmask)
    s_lo = k * chunk_s
    s_hi = tl.minimum(s_lo + chunk_s, S)
    for n in range(n_lo, n_hi):
        if not POOL:
            # Sets (n, g) of this tile's channels; batch_block is 1 here, so n == n_lo.
            stat = n * G + c // Cg
            first = (c // Cg) * Cg
            shift = _load_value(
                X,
                R,
                _row_offsets(n, first, sxn, sxc),
                _row_offsets(n, first, srn, src),
                cmask,
                HAS_RESIDUAL,
                ACC,
            ).to(ACC)
            if PER_CHANNEL:
                mean_d, m2 = _channel_stats(
                    PMEAN,
                    PM2,
                    c,
                    cmask,
                    n * split,
                    n * split + split,
                    N,
                    C,
                    S,
                    1,
                    chunk_s,
                    split,
                    ACC,
                    BLOCK_C,
                )
                rstd = _inv_std(m2 / set_size, eps, ACC)
            else:
                mean_d = tl.zeros([BLOCK_C], ACC)
                rstd = tl.zeros([BLOCK_C], ACC)
                g_hi = (tl.minimum(c_lo + BLOCK_C, C) - 1) // Cg
                for gi in range(c_lo // Cg, g_hi + 1):
                    md, var = _group_stats(
                        PMEAN, PM2, n, gi * Cg, C, S, Cg, chunk_s, split, set_size, ACC, BLOCK_F
                    )
                    here = (c // Cg) == gi
                    mean_d = tl.where(here, md, mean_d)
                    rstd = tl.where(here, _inv_std(var, eps, ACC), rstd)
            if k == 0:  # the set's first channel, in the first chunk: one writer per set
                owner = cmask & (c == first)
                tl.store(MEAN + stat, shift + mean_d, mask=owner)
                tl.store(RSTD + stat, rstd, mask=owner)
        x_rows = _row_offsets(n, c, sxn, sxc)
        r_rows = _row_offsets(n, c, srn, src)
        y_rows = _row_offsets(n, c, syn, syc)
        t_rows = _row_offsets(n, c, stn, stc)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_hi)[None, :]
            xv = _load_value(
                X,
                R,
                _tile_offsets(x_rows, s, sxs),
                _tile_offsets(r_rows, s, srs),
                mask,
                HAS_RESIDUAL,
                ACC,
            )
            if HAS_RESIDUAL:
                tl.store(SUM + _tile_offsets(t_rows, s, sts), xv, mask=mask)
            z = ((xv.to(ACC) - shift[:, None]) - mean_d[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                z = z * w[:, None]
            if HAS_BIAS:
                z = z + b[:, None]
            z = _activate(z, ACTIVATION)
            tl.store(Y + _tile_offsets(y_rows, s, sys), z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_fused_kernel(
    X,  # (N, C, S) input
    R,  # residual
    Y,  # out: output
    SUM,  # out: x + residual
    W,  # (C,) weight
    B,  # (C,) bias
    MEAN,  # (N, G) out
    RSTD,  # (N, G) out
    eps,
    set_size,  # Cg * S as a float
    S,
    G,
    Cg,
    sxn,
    sxc,
    sxs,
    srn,
    src,
    srs,
    syn,
    syc,
    sys,
    stn,
    stc,
    sts,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ONE_TILE: tl.constexpr,  # the whole set is one tile: keep it in registers, read x once
):
    set_id = tl.program_id(0)
    n = set_id // G
    c0 = (set_id - n * G) * Cg
    shift = _load_value(
        X,
        R,
        _row_offsets(n, c0, sxn, sxc),
        _row_offsets(n, c0, srn, src),
        True,
        HAS_RESIDUAL,
        ACC,
    ).to(ACC)
    if ONE_TILE:
        cc = tl.arange(0, BLOCK_C)
        c = c0 + cc
        s = tl.arange(0, BLOCK_S)
        cmask = cc < Cg
        mask = cmask[:, None] & (s < S)[None, :]
        xv = _load_value(
            X,
            R,
            _tile_offsets(_row_offsets(n, c, sxn, sxc), s, sxs),
            _tile_offsets(_row_offsets(n, c, srn, src), s, srs),
            mask,
            HAS_RESIDUAL,
            ACC,
        )
        d = tl.where(mask, xv.to(ACC) - shift, 0.0)
        mean_d = tl.sum(tl.sum(d, axis=1), axis=0) / set_size
        dc = tl.where(mask, d - mean_d, 0.0)
        var = tl.sum(tl.sum(dc * dc, axis=1), axis=0) / set_size
        rstd = _inv_std(var, eps, ACC)
        tl.store(MEAN + set_id, shift + mean_d)
        tl.store(RSTD + set_id, rstd)
        if HAS_RESIDUAL:
            t_offs = _tile_offsets(_row_offsets(n, c, stn, stc), s, sts)
            tl.store(SUM + t_offs, xv, mask=mask)
        z = dc * rstd  # ((v - shift) - mean_d) * rstd: the shifted form keeps v's digits
        if HAS_WEIGHT:
            z = z * tl.load(W + c, mask=cmask, other=0.0).to(ACC)[:, None]
        if HAS_BIAS:
            z = z + tl.load(B + c, mask=cmask, other=0.0).to(ACC)[:, None]
        z = _activate(z, ACTIVATION)
        y_offs = _tile_offsets(_row_offsets(n, c, syn, syc), s, sys)
        tl.store(Y + y_offs, z.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: running (count, mean, M2) per channel slot of the tile, merged by Chan's rule.
        cnt_r = tl.zeros([BLOCK_C], ACC)
        mean_r = tl.zeros([BLOCK_C], ACC)
        m2_r = tl.zeros([BLOCK_C], ACC)
        for cs in range(0, Cg, BLOCK_C):
            cc = cs + tl.arange(0, BLOCK_C)
            cmask = cc < Cg
            x_rows = _row_offsets(n, c0 + cc, sxn, sxc)
            r_rows = _row_offsets(n, c0 + cc, srn, src)
            for s0 in range(0, S, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (s < S)[None, :]
                v = _load_value(
                    X,
                    R,
                    _tile_offsets(x_rows, s, sxs),
                    _tile_offsets(r_rows, s, srs),
                    mask,
                    HAS_RESIDUAL,
                    ACC,
                ).to(ACC)
                d = tl.where(mask, v - shift, 0.0)
                nb = tl.where(cmask, tl.minimum(s0 + BLOCK_S, S) - s0, 0).to(ACC)
                bmean = tl.sum(d, axis=1) / tl.maximum(nb, 1.0)
                dc = tl.where(mask, d - bmean[:, None], 0.0)
                bm2 = tl.sum(dc * dc, axis=1)
                tot = cnt_r + nb
                frac = nb / tl.maximum(tot, 1.0)
                delta = bmean - mean_r
                mean_r += delta * frac
                m2_r += bm2 + delta * delta * cnt_r * frac
                cnt_r = tot
        mean_d = tl.sum(cnt_r * mean_r, axis=0) / set_size
        dm = mean_r - mean_d
        var = tl.sum(m2_r + cnt_r * dm * dm, axis=0) / set_size
        rstd = _inv_std(var, eps, ACC)
        tl.store(MEAN + set_id, shift + mean_d)
        tl.store(RSTD + set_id, rstd)
        # Pass 2: the set was just read by this program; the re-read is meant to hit L2.
        for cs in range(0, Cg, BLOCK_C):
            cc = cs + tl.arange(0, BLOCK_C)
            c = c0 + cc
            cmask = cc < Cg
            x_rows = _row_offsets(n, c, sxn, sxc)
            r_rows = _row_offsets(n, c, srn, src)
            y_rows = _row_offsets(n, c, syn, syc)
            t_rows = _row_offsets(n, c, stn, stc)
            if HAS_WEIGHT:
                w = tl.load(W + c, mask=cmask, other=0.0).to(ACC)
            if HAS_BIAS:
                b = tl.load(B + c, mask=cmask, other=0.0).to(ACC)
            for s0 in range(0, S, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (s < S)[None, :]
                xv = _load_value(
                    X,
                    R,
                    _tile_offsets(x_rows, s, sxs),
                    _tile_offsets(r_rows, s, srs),
                    mask,
                    HAS_RESIDUAL,
                    ACC,
                )
                if HAS_RESIDUAL:
                    tl.store(SUM + _tile_offsets(t_rows, s, sts), xv, mask=mask)
                z = ((xv.to(ACC) - shift) - mean_d) * rstd
                if HAS_WEIGHT:
                    z = z * w[:, None]
                if HAS_BIAS:
                    z = z + b[:, None]
                z = _activate(z, ACTIVATION)
                tl.store(Y + _tile_offsets(y_rows, s, sys), z.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grad_tile(
    X,
    DY,
    x_offs,
    dy_offs,
    mask,
    mean,
    rstd,
    w,
    b,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
):
    """(xhat, dz) for a tile; mean/rstd/w/b are already broadcastable to it. dz is 0 off-mask."""
    v = tl.load(X + x_offs, mask=mask, other=0.0).to(ACC)
    dz = tl.load(DY + dy_offs, mask=mask, other=0.0).to(ACC)
    xhat = (v - mean) * rstd
    if ACTIVATION != 0:
        z = xhat
        if HAS_WEIGHT:
            z = z * w
        if HAS_BIAS:
            z = z + b
        dz = tl.where(mask, dz * _activation_grad(z, ACTIVATION), 0.0)
    return xhat, dz


@triton.jit
def _bwd_partial_kernel(
    DY,  # (N, C, S) output gradient
    X,  # (N, C, S) what was normalized (x + residual when there was one)
    W,  # (C,) weight
    B,  # (C,) bias (needed to recompute the activation's input)
    MEAN,  # (N, G) or (C,)
    RSTD,
    PDW,  # (rows, C) out: sum of dz * xhat per channel over the program's chunk
    PDB,  # (rows, C) out: sum of dz per channel over the program's chunk
    db_at,  # offset of PDB from the pointer passed (both halves of one buffer)
    N,
    C,
    S,
    G,
    Cg,
    batch_block,
    chunk_s,
    split,
    sxn,
    sxc,
    sxs,
    sdn,
    sdc,
    sds,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    POOL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    PDB = PDB + db_at
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    nb_id = pid_r // split
    k = pid_r - nb_id * split
    n_lo = nb_id * batch_block
    n_hi = tl.minimum(n_lo + batch_block, N)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    w = tl.load(W + c, mask=cmask & HAS_WEIGHT, other=1.0).to(ACC)[:, None]
    b = tl.load(B + c, mask=cmask & HAS_BIAS, other=0.0).to(ACC)[:, None]
    s_lo = k * chunk_s
    s_hi = tl.minimum(s_lo + chunk_s, S)
    sdw = tl.zeros([BLOCK_C], ACC)
    sdb = tl.zeros([BLOCK_C], ACC)
    for n in range(n_lo, n_hi):
        if POOL:
            stat = c
        else:
            stat = n * G + c // Cg
        mean = tl.load(MEAN + stat, mask=cmask, other=0.0).to(ACC)[:, None]
        rstd = tl.load(RSTD + stat, mask=cmask, other=0.0).to(ACC)[:, None]
        x_rows = _row_offsets(n, c, sxn, sxc)
        d_rows = _row_offsets(n, c, sdn, sdc)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_hi)[None, :]
            xhat, dz = _grad_tile(
                X,
                DY,
                _tile_offsets(x_rows, s, sxs),
                _tile_offsets(d_rows, s, sds),
                mask,
                mean,
                rstd,
                w,
                b,
                HAS_WEIGHT,
                HAS_BIAS,
                ACTIVATION,
                ACC,
            )
            sdb += tl.sum(dz, axis=1)
            sdw += tl.sum(dz * xhat, axis=1)
    ws = pid_r.to(tl.int64) * C + c
    tl.store(PDW + ws, sdw, mask=cmask)
    tl.store(PDB + ws, sdb, mask=cmask)


@triton.jit
def _channel_grad_sums(
    PDW, PDB, c, cmask, row_lo, row_hi, C, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    """(sum of dz, sum of dz * xhat) per channel over workspace rows [row_lo, row_hi)."""
    sdb = tl.zeros([BLOCK], ACC)
    sdw = tl.zeros([BLOCK], ACC)
    for a in range(row_lo, row_hi):
        offs = tl.cast(a, tl.int64) * C + c
        sdb += tl.load(PDB + offs, mask=cmask, other=0.0)
        sdw += tl.load(PDW + offs, mask=cmask, other=0.0)
    return sdb, sdw


@triton.jit
def _group_grad_sums(
    PDW,
    PDB,
    W,
    n,
    c0,
    C,
    Cg,
    split,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(sum of w * dz, sum of w * dz * xhat) over set (n, channels c0..c0+Cg), from its rows."""
    base = tl.cast(n, tl.int64) * split * C + c0
    entries = split * Cg
    acc_g = tl.zeros([BLOCK], ACC)
    acc_gx = tl.zeros([BLOCK], ACC)
    for j0 in range(0, entries, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < entries
        a = j // Cg
        b = j - a * Cg
        offs = base + a.to(tl.int64) * C + b
        pdb = tl.load(PDB + offs, mask=m, other=0.0)
        pdw = tl.load(PDW + offs, mask=m, other=0.0)
        if HAS_WEIGHT:
            w = tl.load(W + c0 + b, mask=m, other=0.0).to(ACC)
            pdb = pdb * w
            pdw = pdw * w
        acc_g += pdb
        acc_gx += pdw
    return tl.sum(acc_g, axis=0), tl.sum(acc_gx, axis=0)


@triton.jit
def _bwd_apply_kernel(
    DY,  # (N, C, S) output gradient
    X,  # (N, C, S) what was normalized
    W,
    B,
    MEAN,
    RSTD,
    PDW,  # (rows, C) partial sums of dz * xhat (unused if STATS_GIVEN)
    PDB,  # (rows, C) partial sums of dz (unused if STATS_GIVEN)
    db_at,  # offset of PDB from the pointer passed (both halves of one buffer)
    DX,  # (N, C, S) out
    set_size,
    N,
    C,
    S,
    G,
    Cg,
    batch_block,
    chunk_s,
    split,
    sxn,
    sxc,
    sxs,
    sdn,
    sdc,
    sds,
    son,
    soc,
    sos,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    POOL: tl.constexpr,
    STATS_GIVEN: tl.constexpr,
    PER_CHANNEL: tl.constexpr,  # every set is one channel (batch norm, or Cg == 1)
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    PDB = PDB + db_at
    # c1 = mean over the set of w * dz and c2 = mean of w * dz * xhat are reduced here from the
    # partials of the program's own sets (no separate finalize launch).
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    nb_id = pid_r // split
    k = pid_r - nb_id * split
    n_lo = nb_id * batch_block
    n_hi = tl.minimum(n_lo + batch_block, N)
    c_lo = pid_c * BLOCK_C
    c = c_lo + tl.arange(0, BLOCK_C)
    cmask = c < C
    w1 = tl.load(W + c, mask=cmask & HAS_WEIGHT, other=1.0).to(ACC)
    w = w1[:, None]
    b = tl.load(B + c, mask=cmask & HAS_BIAS, other=0.0).to(ACC)[:, None]
    if not STATS_GIVEN:
        if POOL:
            rows = tl.cdiv(N, batch_block) * split
            c1, c2 = _channel_grad_sums(PDW, PDB, c, cmask, 0, rows, C, ACC, BLOCK_C)
            c1 = (c1 * w1 / set_size)[:, None]
            c2 = (c2 * w1 / set_size)[:, None]
    s_lo = k * chunk_s
    s_hi = tl.minimum(s_lo + chunk_s, S)
    for n in range(n_lo, n_hi):
        if POOL:
            stat = c
        else:
            stat = n * G + c // Cg
            if not STATS_GIVEN:
                if PER_CHANNEL:
                    c1, c2 = _channel_grad_sums(
                        PDW, PDB, c, cmask, n * split, n * split + split, C, ACC, BLOCK_C
                    )
                    c1 = (c1 * w1 / set_size)[:, None]
                    c2 = (c2 * w1 / set_size)[:, None]
                else:
                    c1v = tl.zeros([BLOCK_C], ACC)
                    c2v = tl.zeros([BLOCK_C], ACC)
                    g_hi = (tl.minimum(c_lo + BLOCK_C, C) - 1) // Cg
                    for gi in range(c_lo // Cg, g_hi + 1):
                        s1, s2 = _group_grad_sums(
                            PDW, PDB, W, n, gi * Cg, C, Cg, split, HAS_WEIGHT, ACC, BLOCK_F
                        )
                        here = (c // Cg) == gi
                        c1v = tl.where(here, s1 / set_size, c1v)
                        c2v = tl.where(here, s2 / set_size, c2v)
                    c1 = c1v[:, None]
                    c2 = c2v[:, None]
        mean = tl.load(MEAN + stat, mask=cmask, other=0.0).to(ACC)[:, None]
        rstd = tl.load(RSTD + stat, mask=cmask, other=0.0).to(ACC)[:, None]
        x_rows = _row_offsets(n, c, sxn, sxc)
        d_rows = _row_offsets(n, c, sdn, sdc)
        o_rows = _row_offsets(n, c, son, soc)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_hi)[None, :]
            xhat, dz = _grad_tile(
                X,
                DY,
                _tile_offsets(x_rows, s, sxs),
                _tile_offsets(d_rows, s, sds),
                mask,
                mean,
                rstd,
                w,
                b,
                HAS_WEIGHT,
                HAS_BIAS,
                ACTIVATION,
                ACC,
            )
            g = dz * w
            if STATS_GIVEN:
                dx = g * rstd
            else:
                dx = (g - c1 - xhat * c2) * rstd
            tl.store(DX + _tile_offsets(o_rows, s, sos), dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_fused_kernel(
    DY,  # (N, C, S) output gradient
    X,  # (N, C, S) what was normalized
    W,
    B,
    MEAN,  # (N, G)
    RSTD,
    PDW,  # (N, C) out: sum over positions of dz * xhat
    PDB,  # (N, C) out: sum over positions of dz
    db_at,  # offset of PDB from the pointer passed (both halves of one buffer)
    DX,  # (N, C, S) out
    set_size,
    C,
    S,
    G,
    Cg,
    sxn,
    sxc,
    sxs,
    sdn,
    sdc,
    sds,
    son,
    soc,
    sos,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    PDB = PDB + db_at
    set_id = tl.program_id(0)
    n = set_id // G
    c0 = (set_id - n * G) * Cg
    mean = tl.load(MEAN + set_id).to(ACC)
    rstd = tl.load(RSTD + set_id).to(ACC)
    acc_g = tl.zeros([BLOCK_C], ACC)
    acc_gx = tl.zeros([BLOCK_C], ACC)
    for cs in range(0, Cg, BLOCK_C):
        cc = cs + tl.arange(0, BLOCK_C)
        c = c0 + cc
        cmask = cc < Cg
        w = tl.load(W + c, mask=cmask & HAS_WEIGHT, other=1.0).to(ACC)
        b = tl.load(B + c, mask=cmask & HAS_BIAS, other=0.0).to(ACC)
        x_rows = _row_offsets(n, c, sxn, sxc)
        d_rows = _row_offsets(n, c, sdn, sdc)
        # Element-wise accumulators, reduced once after the loop: fewer shuffles per tile, and
        # Triton 3.6's thread-locality pass crashes on float32 reductions inside this loop.
        tdw = tl.zeros([BLOCK_C, BLOCK_S], ACC)
        tdb = tl.zeros([BLOCK_C, BLOCK_S], ACC)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < S)[None, :]
            xhat, dz = _grad_tile(
                X,
                DY,
                _tile_offsets(x_rows, s, sxs),
                _tile_offsets(d_rows, s, sds),
                mask,
                mean,
                rstd,
                w[:, None],
                b[:, None],
                HAS_WEIGHT,
                HAS_BIAS,
                ACTIVATION,
                ACC,
            )
            tdb += dz
            tdw += dz * xhat  # dz is 0 off the mask
        sdw = tl.sum(tdw, axis=1)
        sdb = tl.sum(tdb, axis=1)
        ws = n.to(tl.int64) * C + c
        tl.store(PDW + ws, sdw, mask=cmask)
        tl.store(PDB + ws, sdb, mask=cmask)
        acc_g += tl.where(cmask, w * sdb, 0.0)
        acc_gx += tl.where(cmask, w * sdw, 0.0)
    c1 = tl.sum(acc_g, axis=0) / set_size
    c2 = tl.sum(acc_gx, axis=0) / set_size
    for cs in range(0, Cg, BLOCK_C):
        cc = cs + tl.arange(0, BLOCK_C)
        c = c0 + cc
        cmask = cc < Cg
        w = tl.load(W + c, mask=cmask & HAS_WEIGHT, other=1.0).to(ACC)
        b = tl.load(B + c, mask=cmask & HAS_BIAS, other=0.0).to(ACC)
        x_rows = _row_offsets(n, c, sxn, sxc)
        d_rows = _row_offsets(n, c, sdn, sdc)
        o_rows = _row_offsets(n, c, son, soc)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < S)[None, :]
            xhat, dz = _grad_tile(
                X,
                DY,
                _tile_offsets(x_rows, s, sxs),
                _tile_offsets(d_rows, s, sds),
                mask,
                mean,
                rstd,
                w[:, None],
                b[:, None],
                HAS_WEIGHT,
                HAS_BIAS,
                ACTIVATION,
                ACC,
            )
            dx = (dz * w[:, None] - c1 - xhat * c2) * rstd
            tl.store(DX + _tile_offsets(o_rows, s, sos), dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _column_sum_kernel(
    PW,  # (rows, C) partials of dweight
    PB,  # (rows, C) partials of dbias
    b_at,  # offset of PB from the pointer passed (both halves of one buffer)
    DW,  # (C,) out: sum over rows of PW, in fixed order (written if HAS_DW)
    DB,  # (C,) out: sum over rows of PB (written if HAS_DB)
    rows,
    C,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dweight and dbias in one launch; the reduction order depends only on the shape."""
    PB = PB + b_at
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc_w = tl.zeros([BLOCK_C], PW.dtype.element_ty)
    acc_b = tl.zeros([BLOCK_C], PB.dtype.element_ty)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < rows)[:, None] & cmask[None, :]
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        if HAS_DW:
            acc_w += tl.sum(tl.load(PW + offs, mask=mask, other=0.0), axis=0)
        if HAS_DB:
            acc_b += tl.sum(tl.load(PB + offs, mask=mask, other=0.0), axis=0)
    if HAS_DW:
        tl.store(DW + c, acc_w.to(DW.dtype.element_ty), mask=cmask)
    if HAS_DB:
        tl.store(DB + c, acc_b.to(DB.dtype.element_ty), mask=cmask)


__all__ = ["ACTIVATION_CODES", "triton"]
