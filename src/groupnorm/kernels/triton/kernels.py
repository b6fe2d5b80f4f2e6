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
* ``mean = shift + mean_d``, ``rstd = 1 / sqrt(m2 / set_size + eps)``;
* ``xhat = (v - mean) * rstd``, ``z = xhat * w + b``, ``y = act(z)``.

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

#: Activation name -> the compile-time code the kernels branch on.
ACTIVATION_CODES = {"": 0, "silu": 1, "gelu": 2, "relu": 3}

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
    if ACTIVATION == 1:  # silu
        z = z / (1.0 + tl.exp(-z))
    elif ACTIVATION == 2:  # gelu, exact erf form
        z = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT_HALF))
    elif ACTIVATION == 3:  # relu
        z = tl.where(z > 0.0, z, 0.0)
    return z


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """f'(z) for the fused activation (only called when ACTIVATION != 0)."""
    if ACTIVATION == 1:
        sig = 1.0 / (1.0 + tl.exp(-z))
        grad = sig * (1.0 + z * (1.0 - sig))
    elif ACTIVATION == 2:
        grad = 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    else:
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
def _fwd_finalize_kernel(
    X,  # input, for the shift (first element of each set)
    R,  # residual
    PMEAN,  # (rows, C) partial shifted means
    PM2,  # (rows, C) partial M2
    MEAN,  # (sets,) out: mean
    RSTD,  # (sets,) out: 1 / sqrt(var + eps)
    N,
    C,
    S,
    G,  # sets per sample (unused for batch norm)
    Cg,
    batch_block,  # samples per workspace row (1 unless batch norm)
    chunk_s,
    split,
    set_size,  # elements per set, as a float
    eps,
    sxn,
    sxc,
    srn,
    src,
    HAS_RESIDUAL: tl.constexpr,
    POOL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    set_id = tl.program_id(0)
    # The set's partials are entries (a, b): row a of the workspace, channel c0 + b.
    if POOL:
        n0 = set_id * 0
        c0 = set_id
        rows = tl.cdiv(N, batch_block) * split
        width = 1
        base = c0.to(tl.int64)
    else:
        n0 = set_id // G
        c0 = (set_id - n0 * G) * Cg
        rows = split
        width = Cg
        base = n0.to(tl.int64) * split * C + c0
    shift = _load_value(
        X,
        R,
        _row_offsets(n0, c0, sxn, sxc),
        _row_offsets(n0, c0, srn, src),
        True,
        HAS_RESIDUAL,
        ACC,
    ).to(ACC)
    entries = rows * width
    acc = tl.zeros([BLOCK], ACC)
    for j0 in range(0, entries, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < entries
        a = j // width
        samples = tl.minimum(batch_block, N - (a // split) * batch_block)
        cnt = (samples * tl.minimum(chunk_s, S - (a % split) * chunk_s)).to(ACC)
        pm = tl.load(PMEAN + base + a.to(tl.int64) * C + (j - a * width), mask=m, other=0.0)
        acc += tl.where(m, cnt * pm, 0.0)
    mean_d = tl.sum(acc, axis=0) / set_size
    acc = tl.zeros([BLOCK], ACC)
    for j0 in range(0, entries, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < entries
        a = j // width
        samples = tl.minimum(batch_block, N - (a // split) * batch_block)
        cnt = (samples * tl.minimum(chunk_s, S - (a % split) * chunk_s)).to(ACC)
        offs = base + a.to(tl.int64) * C + (j - a * width)
        pm = tl.load(PMEAN + offs, mask=m, other=0.0)
        pm2 = tl.load(PM2 + offs, mask=m, other=0.0)
        dm = pm - mean_d
        acc += tl.where(m, pm2 + cnt * dm * dm, 0.0)
    var = tl.sum(acc, axis=0) / set_size
    tl.store(MEAN + set_id, shift + mean_d)
    tl.store(RSTD + set_id, _inv_std(var, eps, ACC))


@triton.jit
def _fwd_apply_kernel(
    X,  # (N, C, S) input
    R,  # residual
    Y,  # (N, C, S) out: output
    SUM,  # (N, C, S) out: x + residual (written only if HAS_RESIDUAL)
    W,  # (C,) weight
    B,  # (C,) bias
    MEAN,  # (N, G) or (C,) statistics
    RSTD,
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
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    nb_id = pid_r // split
    k = pid_r - nb_id * split
    n_lo = nb_id * batch_block
    n_hi = tl.minimum(n_lo + batch_block, N)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if HAS_WEIGHT:
        w = tl.load(W + c, mask=cmask, other=0.0).to(ACC)
    if HAS_BIAS:
        b = tl.load(B + c, mask=cmask, other=0.0).to(ACC)
    s_lo = k * chunk_s
    s_hi = tl.minimum(s_lo + chunk_s, S)
    for n in range(n_lo, n_hi):
        if POOL:
            stat = c
        else:
            stat = n * G + c // Cg
        mean = tl.load(MEAN + stat, mask=cmask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + stat, mask=cmask, other=0.0).to(ACC)
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
            z = (xv.to(ACC) - mean[:, None]) * rstd[:, None]
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
    S,
    G,
    Cg,
    set_size,  # Cg * S as a float
    eps,
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
        mean = shift + mean_d
        rstd = _inv_std(var, eps, ACC)
        tl.store(MEAN + set_id, mean)
        tl.store(RSTD + set_id, rstd)
        if HAS_RESIDUAL:
            t_offs = _tile_offsets(_row_offsets(n, c, stn, stc), s, sts)
            tl.store(SUM + t_offs, xv, mask=mask)
        z = (xv.to(ACC) - mean) * rstd
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
        mean = shift + mean_d
        rstd = _inv_std(var, eps, ACC)
        tl.store(MEAN + set_id, mean)
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
                z = (xv.to(ACC) - mean) * rstd
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
def _bwd_finalize_kernel(
    PDW,  # (rows, C) partial sum of dz * xhat
    PDB,  # (rows, C) partial sum of dz
    W,  # (C,) weight
    C1,  # (sets,) out: mean over the set of w * dz
    C2,  # (sets,) out: mean over the set of w * dz * xhat
    N,
    C,
    G,
    Cg,
    batch_block,
    split,
    set_size,
    HAS_WEIGHT: tl.constexpr,
    POOL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    set_id = tl.program_id(0)
    if POOL:
        c0 = set_id
        rows = tl.cdiv(N, batch_block) * split
        width = 1
        base = c0.to(tl.int64)
    else:
        n0 = set_id // G
        c0 = (set_id - n0 * G) * Cg
        rows = split
        width = Cg
        base = n0.to(tl.int64) * split * C + c0
    entries = rows * width
    acc_g = tl.zeros([BLOCK], ACC)
    acc_gx = tl.zeros([BLOCK], ACC)
    for j0 in range(0, entries, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < entries
        a = j // width
        b = j - a * width
        offs = base + a.to(tl.int64) * C + b
        pdb = tl.load(PDB + offs, mask=m, other=0.0)
        pdw = tl.load(PDW + offs, mask=m, other=0.0)
        if HAS_WEIGHT:
            w = tl.load(W + c0 + b, mask=m, other=0.0).to(ACC)
            pdb = pdb * w
            pdw = pdw * w
        acc_g += pdb
        acc_gx += pdw
    tl.store(C1 + set_id, tl.sum(acc_g, axis=0) / set_size)
    tl.store(C2 + set_id, tl.sum(acc_gx, axis=0) / set_size)


@triton.jit
def _bwd_apply_kernel(
    DY,  # (N, C, S) output gradient
    X,  # (N, C, S) what was normalized
    W,
    B,
    MEAN,
    RSTD,
    C1,  # (sets,) mean of w * dz (unused if STATS_GIVEN)
    C2,  # (sets,) mean of w * dz * xhat (unused if STATS_GIVEN)
    DX,  # (N, C, S) out
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
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
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
    for n in range(n_lo, n_hi):
        if POOL:
            stat = c
        else:
            stat = n * G + c // Cg
        mean = tl.load(MEAN + stat, mask=cmask, other=0.0).to(ACC)[:, None]
        rstd = tl.load(RSTD + stat, mask=cmask, other=0.0).to(ACC)[:, None]
        if not STATS_GIVEN:
            c1 = tl.load(C1 + stat, mask=cmask, other=0.0)[:, None]
            c2 = tl.load(C2 + stat, mask=cmask, other=0.0)[:, None]
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
    DX,  # (N, C, S) out
    C,
    S,
    G,
    Cg,
    set_size,
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


@triton.jit
def _offset_probe_kernel(
    OUT,  # (BLOCK,) int64 out: offsets computed by the kernels' helpers
    N_IDX,  # (BLOCK,) int32 sample indices
    C_IDX,  # (BLOCK,) int32 channel indices
    S_IDX,  # (BLOCK,) int32 spatial indices
    stride_n,
    stride_c,
    stride_s,
    BLOCK: tl.constexpr,
):
    """Runs the offset helpers on given indices, so tests can check them past 2**31."""
    i = tl.arange(0, BLOCK)
    n = tl.load(N_IDX + i)
    c = tl.load(C_IDX + i)
    s = tl.load(S_IDX + i)
    rows = _row_offsets(n, c, stride_n, stride_c)
    offs = _tile_offsets(rows, s, stride_s)  # (BLOCK, BLOCK); the diagonal pairs row i with s[i]
    diag = tl.sum(tl.where(i[:, None] == i[None, :], offs, 0), axis=1)
    tl.store(OUT + i, diag)


__all__ = ["ACTIVATION_CODES", "triton"]
