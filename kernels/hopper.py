"""Hopper (sm_90) sparse attention: segment walk, 128-row query tiles, persistent grid; fused backward.

Device code only; the launch plans are in :mod:`.hopper_plan`, the design in ``docs/design.md``
("Triton kernels on Hopper").

Forward: each work item is one (query tile of ``BLOCK_M`` = 128 rows, batch*head). The tile is
held as two 64-row halves (``q0``, ``q1``), one per consumer warpgroup when Triton warp-specialises
the loops (``WS``; a producer warp streams K/V through TMA tensor descriptors, ``TMA``). The key
tiles a query tile reads are given by its *segment record* (:func:`_run_tile`): up to three runs of
consecutive key tiles that need no element mask (``full``) and up to three that do (``partial``),
walked by two flat loops with no table load per tile. Programs loop over work items, heaviest query
tiles first (``ORDER``), so the grid ends on light items.

Backward (:func:`_bwd_fused`): one launch. A key-tile program holds ``BLOCK_N`` = 128 keys as two
64-key halves with their dK/dV in registers and streams 64-row query steps from its segment record
(transposed table): per step 5 GEMMs (S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q,
dQ_part = dS K) and one exp pass; dQ is accumulated in float32 with atomics into a scratch buffer.
With ``DETERMINISTIC`` the key-tile programs skip dQ and the same launch's query-tile programs
compute it from their own segment records (no atomics, bit-reproducible). ``delta = rowsum(dO * O)``
(minus the lse gradient) comes from the pre-pass :func:`_bwd_delta`, which also zeroes the scratch.

Masked entries are excluded before they can reach a product: scores are replaced (not offset) by
-inf, probabilities by 0, and in partial tiles the K/V/Q rows a GEMM multiplies by a zero weight are
zeroed first when they are not finite (``0 * nan`` is nan in any matrix unit), so values hidden by
the mask never influence an output or a gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..masks import KIND_IDS

#: kind ids of ``dalle_fast.masks`` as compile-time constants
ROW = tl.constexpr(KIND_IDS["row"])
COL = tl.constexpr(KIND_IDS["col"])
CONV = tl.constexpr(KIND_IDS["conv"])
AXIAL_ROW = tl.constexpr(KIND_IDS["axial_row"])
AXIAL_COL = tl.constexpr(KIND_IDS["axial_col"])
CONV_LIKE = tl.constexpr(KIND_IDS["conv_like"])
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: ints per segment record: (start, length) of 3 full runs, then of 3 partial runs
SEG_INTS = 12
SEG_RUNS = 3


@triton.jit
def _run_tile(j, S0, L0, S1, L1, S2, L2):
    """Key (or query) tile of iteration ``j`` of a walk over three runs ``[S_i, S_i + L_i)``."""
    t = S0 + j
    t = tl.where(j >= L0, S1 + (j - L0), t)
    t = tl.where(j >= L0 + L1, S2 + (j - L0 - L1), t)
    return t


@triton.jit
def _grid_pos(mpos, T, S):
    """(image row, image column) of mask positions, for :func:`_allowed` (text positions: any)."""
    m = mpos - T
    return m // S, m % S


@triton.jit
def _allowed(pq, rq, cq, pk, rk, ck, T, S, KS, DIL, KIND: tl.constexpr):
    """Mask predicate of ``Layout.allowed`` (``dalle_fast.masks``) on broadcastable int32 positions
    ``pq``/``pk`` with their image rows and columns (:func:`_grid_pos`, computed once per tile, so
    the per-score work is compares). Out-of-range slots carry positions that fail causality (queries
    -1, keys >= seq_len)."""
    causal = pk <= pq
    img = causal
    if KIND == ROW:  # the previous S image positions and itself
        img = pk >= pq - S
    elif KIND == COL or KIND == AXIAL_COL:  # same column
        img = ck == cq
    elif KIND == CONV:  # K x K window above and beside, no wrap-around
        # 0 <= rq - rk <= h and -h <= ck - cq <= h, as unsigned compares (negatives wrap to huge)
        h = KS // 2
        img = ((rq - rk).to(tl.uint32, bitcast=True) <= h) & ((ck - cq + h).to(tl.uint32, bitcast=True) <= 2 * h)
    elif KIND == AXIAL_ROW:  # same row
        img = rk == rq
    elif KIND == CONV_LIKE:  # dilated K x K window up-left
        dr = rq - rk
        dc = cq - ck
        img = (dr >= 0) & (dc >= 0) & (dr % DIL == 0) & (dc % DIL == 0) & (dr // DIL < KS) & (dc // DIL < KS)
    # text keys need causality only; text queries never meet image keys (causal), so the rows and
    # columns of text positions (negative offsets) never decide a result
    return causal & ((pk < T) | img)


@triton.jit
def _mask(mpos_q, rq, cq, mpos_k, T, S, KS, DIL, KIND: tl.constexpr):
    """(queries x keys) mask of a query block (rows/columns precomputed) and a key tile."""
    rk, ck = _grid_pos(mpos_k, T, S)
    return _allowed(mpos_q[:, None], rq[:, None], cq[:, None], mpos_k[None, :], rk[None, :], ck[None, :],
                    T, S, KS, DIL, KIND)


@triton.jit
def _mask_t(mpos_k, mpos_q, T, S, KS, DIL, KIND: tl.constexpr):
    """(keys x queries) mask: the transpose of :func:`_mask`."""
    rk, ck = _grid_pos(mpos_k, T, S)
    rq, cq = _grid_pos(mpos_q, T, S)
    return _allowed(mpos_q[None, :], rq[None, :], cq[None, :], mpos_k[:, None], rk[:, None], ck[:, None],
                    T, S, KS, DIL, KIND)


@triton.jit
def _slots(PERM, t, N, BLOCK: tl.constexpr, PERMUTED: tl.constexpr, IS_QUERY: tl.constexpr):
    """(address positions, mask positions, in range) of the ``BLOCK`` slots of tile ``t``.
    Out-of-range slots address position 0 and get mask position -1 (queries) or N (keys)."""
    slot = t * BLOCK + tl.arange(0, BLOCK)
    valid = slot < N
    if PERMUTED:
        pos = tl.load(PERM + slot, mask=valid, other=0)
    else:
        pos = tl.where(valid, slot, 0)
    mpos = tl.where(valid, pos, -1 if IS_QUERY else N)
    return pos, mpos, valid


@triton.jit
def _load_rows(desc, base, stride, b, h, t, pos, valid, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
               TMA: tl.constexpr):
    """Rows of tile ``t`` (``BLOCK`` x ``HEAD_DIM``): one TMA box of the 4-D descriptor (rows past
    the sequence end read as zeros), or a gather through ``pos`` (out-of-range rows zero)."""
    if TMA:
        x = desc.load([b, h, t * BLOCK, 0]).reshape(BLOCK, HEAD_DIM)
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        x = tl.load(base + pos[:, None] * stride + offs_d[None, :], mask=valid[:, None], other=0.0)
    return x


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _nonfinite_rows(x):
    """Per row of ``x``: whether it holds a nan or an inf."""
    xf = x.to(tl.float32)
    return tl.max(((xf != xf) | (tl.abs(xf) == float("inf"))).to(tl.int32), 1) > 0


@triton.jit
def _sees_nonfinite(allowed, nonfinite):
    """Per query row of ``allowed`` (queries x keys): whether an allowed key row is non-finite."""
    return tl.max((allowed & nonfinite[None, :]).to(tl.int32), 1) > 0


@triton.jit
def _softmax_step(q, k, v, m_i, l_i, acc, bad, qk_scale, mpos_q, rq, cq, mpos_k, T, S, KS, DIL,
                  KIND: tl.constexpr, SAFE: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step of a query half over a key tile (running max in log2 units).

    The mask replaces scores (a masked nan/inf key never counts). ``SAFE`` also zeroes non-finite
    value rows before P V (a masked-out row's zero weight times nan is nan) and marks in ``bad`` the
    queries allowed to see one (their output is made nan, as the reference's)."""
    qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32), IEEE)
    allowed = _mask(mpos_q, rq, cq, mpos_k, T, S, KS, DIL, KIND)
    qk = tl.where(allowed, qk, float("-inf"))
    if SAFE:
        nonfinite = _nonfinite_rows(v)
        v = tl.where(nonfinite[:, None], 0.0, v)
        bad = bad | _sees_nonfinite(allowed, nonfinite)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return m_new, l_i, acc, bad


@triton.jit
def _store_half(O, LSE, FLAGS, bh, pos, valid, acc, l_i, m_i, bad, s_on, N, HEAD_DIM: tl.constexpr,
                WRITE_FLAGS: tl.constexpr):
    """Out and natural-log lse of a finished query half, and (``WRITE_FLAGS``) whether each row is
    not finite."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows with no allowed key (out of range only)
    out = tl.where(bad[:, None], float("nan"), acc / l_safe[:, None])
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(O + pos[:, None] * s_on + offs_d[None, :], out.to(O.dtype.element_ty), mask=valid[:, None])
    row = bh.to(tl.int64) * N + pos
    tl.store(LSE + row, (m_i + tl.log2(l_safe)) * LN2, mask=valid)
    if WRITE_FLAGS:
        tl.store(FLAGS + row, _nonfinite_rows(out).to(tl.int8), mask=valid)


@triton.jit
def _flagged(FLAGS, bh, pos, valid, N):
    """Whether any of these rows is flagged for repair (a non-finite output row)."""
    return tl.max(tl.load(FLAGS + bh.to(tl.int64) * N + pos, mask=valid, other=0).to(tl.int32), 0) != 0


@triton.jit
def _fwd_hopper(
    desc_q, desc_k, desc_v, Q, K, V, O, LSE, PERM, SEG, ORDER, FLAGS,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
    n_items, BH, H, N, T, S, KS, DIL, qk_scale,
    KIND: tl.constexpr, PERMUTED: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, SAFE: tl.constexpr,
    FIXUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Forward over work items (query tile, batch*head), heaviest tiles first.

    One loop walks the six runs of the tile's segment record (Triton's warp specialisation takes a
    single loop; the mask is applied in every step, true on interior tiles). The fast variant
    (``SAFE`` False) writes ``FLAGS`` (B, H, N) int8: whether an output row is not finite; the
    ``FIXUP`` launch recomputes just the items holding a flagged row, with ``SAFE`` (non-finite values
    hidden by the mask kept out of P V)."""
    HALF: tl.constexpr = BLOCK_M // 2
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        tile = tl.load(ORDER + item // BH)
        bh = item % BH
        redo = True
        if FIXUP:
            fp0, _, fv0 = _slots(PERM, 2 * tile, N, HALF, PERMUTED, True)
            fp1, _, fv1 = _slots(PERM, 2 * tile + 1, N, HALF, PERMUTED, True)
            redo = _flagged(FLAGS, bh, fp0, fv0, N) | _flagged(FLAGS, bh, fp1, fv1, N)
        if redo:
            b = bh // H
            h = bh % H
            b64 = b.to(tl.int64)
            h64 = h.to(tl.int64)
            q_base = Q + b64 * s_qb + h64 * s_qh
            k_base = K + b64 * s_kb + h64 * s_kh
            v_base = V + b64 * s_vb + h64 * s_vh
            rec = SEG + tile * 12
            s0 = tl.load(rec + 0)
            l0 = tl.load(rec + 1)
            s1 = tl.load(rec + 2)
            l1 = tl.load(rec + 3)
            s2 = tl.load(rec + 4)
            l2 = tl.load(rec + 5)
            s3 = tl.load(rec + 6)
            l3 = tl.load(rec + 7)
            s4 = tl.load(rec + 8)
            l4 = tl.load(rec + 9)
            s5 = tl.load(rec + 10)
            l5 = tl.load(rec + 11)

            pos_q0, mpos_q0, valid_q0 = _slots(PERM, 2 * tile, N, HALF, PERMUTED, True)
            pos_q1, mpos_q1, valid_q1 = _slots(PERM, 2 * tile + 1, N, HALF, PERMUTED, True)
            rq0, cq0 = _grid_pos(mpos_q0, T, S)
            rq1, cq1 = _grid_pos(mpos_q1, T, S)
            q0 = _load_rows(desc_q, q_base, s_qn, b, h, 2 * tile, pos_q0, valid_q0, HALF, HEAD_DIM, TMA)
            q1 = _load_rows(desc_q, q_base, s_qn, b, h, 2 * tile + 1, pos_q1, valid_q1, HALF, HEAD_DIM, TMA)
            m0 = tl.full([HALF], float("-inf"), dtype=tl.float32)
            sum0 = tl.zeros([HALF], dtype=tl.float32)
            a0 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
            m1 = tl.full([HALF], float("-inf"), dtype=tl.float32)
            sum1 = tl.zeros([HALF], dtype=tl.float32)
            a1 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
            bad0 = tl.zeros([HALF], dtype=tl.int1)
            bad1 = tl.zeros([HALF], dtype=tl.int1)
            n012 = l0 + l1 + l2
            for j in tl.range(0, n012 + l3 + l4 + l5, warp_specialize=WS):
                t = tl.where(j < n012, _run_tile(j, s0, l0, s1, l1, s2, l2),
                             _run_tile(j - n012, s3, l3, s4, l4, s5, l5))
                pos_k, mpos_k, valid_k = _slots(PERM, t, N, BLOCK_N, PERMUTED, False)
                k = _load_rows(desc_k, k_base, s_kn, b, h, t, pos_k, valid_k, BLOCK_N, HEAD_DIM, TMA)
                v = _load_rows(desc_v, v_base, s_vn, b, h, t, pos_k, valid_k, BLOCK_N, HEAD_DIM, TMA)
                m0, sum0, a0, bad0 = _softmax_step(q0, k, v, m0, sum0, a0, bad0, qk_scale, mpos_q0, rq0, cq0, mpos_k,
                                                   T, S, KS, DIL, KIND, SAFE, IEEE)
                m1, sum1, a1, bad1 = _softmax_step(q1, k, v, m1, sum1, a1, bad1, qk_scale, mpos_q1, rq1, cq1, mpos_k,
                                                   T, S, KS, DIL, KIND, SAFE, IEEE)

            o_base = O + b64 * s_ob + h64 * s_oh
            _store_half(o_base, LSE, FLAGS, bh, pos_q0, valid_q0, a0, sum0, m0, bad0, s_on, N, HEAD_DIM, not FIXUP)
            _store_half(o_base, LSE, FLAGS, bh, pos_q1, valid_q1, a1, sum1, m1, bad1, s_on, N, HEAD_DIM, not FIXUP)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta(O, DO, DLSE, DELTA, DQ, s_ob, s_oh, s_on, s_db, s_dh, s_dn, H, N,
               HAS_DLSE: tl.constexpr, ZERO_DQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(dO * O) - dlse per row (float32), and the float32 dQ scratch zeroed."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = t * BLOCK + tl.arange(0, BLOCK)
    valid = rows < N
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_on + offs_d[None, :], mask=valid[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dn + offs_d[None, :], mask=valid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row64 = bh.to(tl.int64) * N + rows
    if HAS_DLSE:
        delta -= tl.load(DLSE + row64, mask=valid, other=0.0)
    tl.store(DELTA + row64, delta, mask=valid)
    if ZERO_DQ:
        tl.store(DQ + row64[:, None] * HEAD_DIM + offs_d[None, :], tl.zeros([BLOCK, HEAD_DIM], tl.float32),
                 mask=valid[:, None])


@triton.jit
def _bwd_kv_step(kh, vh, mpos_kh, q, do, m_q, delta_q, mpos_q, dk, dv, qk_scale, T, S, KS, DIL,
                 KIND: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One query step for a 64-key half: (dk, dv, dS^T, mask^T), dS^T and the mask keys x queries
    (the mask all true when not ``MASKED``)."""
    sT = _dot(kh, tl.trans(q), tl.zeros([kh.shape[0], q.shape[0]], dtype=tl.float32), IEEE)
    pT = tl.exp2(sT * qk_scale - m_q[None, :])
    dpT = _dot(vh, tl.trans(do), tl.zeros([kh.shape[0], q.shape[0]], dtype=tl.float32), IEEE)
    if MASKED:
        allowed = _mask_t(mpos_kh, mpos_q, T, S, KS, DIL, KIND)
        pT = tl.where(allowed, pT, 0.0)
        dsT = tl.where(allowed, pT * (dpT - delta_q[None, :]), 0.0)
    else:
        allowed = tl.full([kh.shape[0], q.shape[0]], 1, tl.int1)
        dsT = pT * (dpT - delta_q[None, :])
    dv = _dot(pT.to(do.dtype), do, dv, IEEE)
    dk = _dot(dsT.to(q.dtype), q, dk, IEEE)
    return dk, dv, dsT, allowed


@triton.jit
def _bwd_fused(
    Q, K, V, DO, LSE, DELTA, DQ_ACC, DQ, DK, DV, DQFLAGS, PERM, KSEG, KORDER, QSEG, QORDER,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
    s_dqb, s_dqh, s_dqn, s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
    n_kv_items, n_q_items, BH, H, N, T, S, KS, DIL, qk_scale, sm_scale,
    KIND: tl.constexpr, PERMUTED: tl.constexpr, DETERMINISTIC: tl.constexpr, FIXUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    """One launch of the backward (see the module doc). ``FIXUP`` (with ``DETERMINISTIC`` and no
    key-tile items): recompute dQ of the query tiles holding a row flagged in ``DQFLAGS`` (B, H, N)."""
    HALF: tl.constexpr = BLOCK_N // 2
    offs_d = tl.arange(0, HEAD_DIM)
    n_items = n_kv_items + n_q_items
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        if item < n_kv_items:
            tile = tl.load(KORDER + item // BH)
            bh = item % BH
            b64 = (bh // H).to(tl.int64)
            h64 = (bh % H).to(tl.int64)
            q_base = Q + b64 * s_qb + h64 * s_qh
            do_base = DO + b64 * s_db + h64 * s_dh
            k_base = K + b64 * s_kb + h64 * s_kh
            v_base = V + b64 * s_vb + h64 * s_vh
            row0 = bh.to(tl.int64) * N
            pos_k0, mpos_k0, valid_k0 = _slots(PERM, 2 * tile, N, HALF, PERMUTED, False)
            pos_k1, mpos_k1, valid_k1 = _slots(PERM, 2 * tile + 1, N, HALF, PERMUTED, False)
            k0 = tl.load(k_base + pos_k0[:, None] * s_kn + offs_d[None, :], mask=valid_k0[:, None], other=0.0)
            k1 = tl.load(k_base + pos_k1[:, None] * s_kn + offs_d[None, :], mask=valid_k1[:, None], other=0.0)
            v0 = tl.load(v_base + pos_k0[:, None] * s_vn + offs_d[None, :], mask=valid_k0[:, None], other=0.0)
            v1 = tl.load(v_base + pos_k1[:, None] * s_vn + offs_d[None, :], mask=valid_k1[:, None], other=0.0)
            # dQ = dS K multiplies masked-out key rows by zero: in masked steps non-finite rows enter it as
            # zeros (see module doc)
            nonfinite_k0 = _nonfinite_rows(k0)
            nonfinite_k1 = _nonfinite_rows(k1)
            dk0 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
            dk1 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
            dv0 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
            dv1 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
            rec = KSEG + tile * 12
            for part in tl.static_range(2):  # 0: interior query tiles, 1: masked edges
                s0 = tl.load(rec + 6 * part + 0)
                l0 = tl.load(rec + 6 * part + 1)
                s1 = tl.load(rec + 6 * part + 2)
                l1 = tl.load(rec + 6 * part + 3)
                s2 = tl.load(rec + 6 * part + 4)
                l2 = tl.load(rec + 6 * part + 5)
                for j in range(0, l0 + l1 + l2):
                    tq = _run_tile(j, s0, l0, s1, l1, s2, l2)
                    pos_q, mpos_q, valid_q = _slots(PERM, tq, N, BLOCK_M, PERMUTED, True)
                    q = tl.load(q_base + pos_q[:, None] * s_qn + offs_d[None, :], mask=valid_q[:, None], other=0.0)
                    do = tl.load(do_base + pos_q[:, None] * s_dn + offs_d[None, :], mask=valid_q[:, None], other=0.0)
                    # out-of-range query rows: m = +inf makes their P exactly 0
                    m_q = tl.load(LSE + row0 + pos_q, mask=valid_q, other=float("inf")) * LOG2E
                    delta_q = tl.load(DELTA + row0 + pos_q, mask=valid_q, other=0.0)
                    MASKED: tl.constexpr = part == 1
                    dk0, dv0, ds0, hit0 = _bwd_kv_step(k0, v0, mpos_k0, q, do, m_q, delta_q, mpos_q, dk0, dv0,
                                                       qk_scale, T, S, KS, DIL, KIND, MASKED, IEEE)
                    dk1, dv1, ds1, hit1 = _bwd_kv_step(k1, v1, mpos_k1, q, do, m_q, delta_q, mpos_q, dk1, dv1,
                                                       qk_scale, T, S, KS, DIL, KIND, MASKED, IEEE)
                    if not DETERMINISTIC:
                        k0c = k0
                        k1c = k1
                        if MASKED:
                            k0c = tl.where(nonfinite_k0[:, None], 0.0, k0)
                            k1c = tl.where(nonfinite_k1[:, None], 0.0, k1)
                        dq = _dot(tl.trans(ds0).to(k0.dtype), k0c, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), IEEE)
                        dq = _dot(tl.trans(ds1).to(k1.dtype), k1c, dq, IEEE)
                        if MASKED:  # queries allowed to see a non-finite key: nan, as the reference
                            bad = tl.max((hit0 & nonfinite_k0[:, None]).to(tl.int32), 0) > 0
                            bad |= tl.max((hit1 & nonfinite_k1[:, None]).to(tl.int32), 0) > 0
                            dq = tl.where(bad[:, None], float("nan"), dq)
                        tl.atomic_add(DQ_ACC + (row0 + pos_q)[:, None] * HEAD_DIM + offs_d[None, :], dq * sm_scale,
                                      mask=valid_q[:, None], sem="relaxed")
            dk_base = DK + b64 * s_dkb + h64 * s_dkh
            dv_base = DV + b64 * s_dvb + h64 * s_dvh
            tl.store(dk_base + pos_k0[:, None] * s_dkn + offs_d[None, :], (dk0 * sm_scale).to(DK.dtype.element_ty),
                     mask=valid_k0[:, None])
            tl.store(dk_base + pos_k1[:, None] * s_dkn + offs_d[None, :], (dk1 * sm_scale).to(DK.dtype.element_ty),
                     mask=valid_k1[:, None])
            tl.store(dv_base + pos_k0[:, None] * s_dvn + offs_d[None, :], dv0.to(DV.dtype.element_ty),
                     mask=valid_k0[:, None])
            tl.store(dv_base + pos_k1[:, None] * s_dvn + offs_d[None, :], dv1.to(DV.dtype.element_ty),
                     mask=valid_k1[:, None])
        elif DETERMINISTIC:
            qi = item - n_kv_items
            tile = tl.load(QORDER + qi // BH)
            bh = qi % BH
            pos_q, mpos_q, valid_q = _slots(PERM, tile, N, BLOCK_M, PERMUTED, True)
            redo = True
            if FIXUP:
                redo = _flagged(DQFLAGS, bh, pos_q, valid_q, N)
            if redo:
                _dq_tile(Q, K, V, DO, LSE, DELTA, DQ, QSEG, PERM, tile, bh, pos_q, mpos_q, valid_q,
                         s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn, s_dqb, s_dqh, s_dqn,
                         H, N, T, S, KS, DIL, qk_scale, sm_scale, KIND, PERMUTED, HEAD_DIM, BLOCK_M, BLOCK_N, IEEE)


@triton.jit
def _dq_tile(Q, K, V, DO, LSE, DELTA, DQ, QSEG, PERM, tile, bh, pos_q, mpos_q, valid_q,
             s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn, s_dqb, s_dqh, s_dqn,
             H, N, T, S, KS, DIL, qk_scale, sm_scale, KIND: tl.constexpr, PERMUTED: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """dQ of one query tile from its own walk over its key tiles (3 GEMMs, 1 exp per tile); in masked
    tiles non-finite key rows enter dS K as zeros and the queries allowed to see one get nan."""
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    row0 = bh.to(tl.int64) * N
    q = tl.load(Q + b64 * s_qb + h64 * s_qh + pos_q[:, None] * s_qn + offs_d[None, :],
                mask=valid_q[:, None], other=0.0)
    do = tl.load(DO + b64 * s_db + h64 * s_dh + pos_q[:, None] * s_dn + offs_d[None, :],
                 mask=valid_q[:, None], other=0.0)
    m_q = tl.load(LSE + row0 + pos_q, mask=valid_q, other=float("inf")) * LOG2E
    delta_q = tl.load(DELTA + row0 + pos_q, mask=valid_q, other=0.0)
    rq, cq = _grid_pos(mpos_q, T, S)
    k_base = K + b64 * s_kb + h64 * s_kh
    v_base = V + b64 * s_vb + h64 * s_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int1)
    rec = QSEG + tile * 12
    for part in tl.static_range(2):
        s0 = tl.load(rec + 6 * part + 0)
        l0 = tl.load(rec + 6 * part + 1)
        s1 = tl.load(rec + 6 * part + 2)
        l1 = tl.load(rec + 6 * part + 3)
        s2 = tl.load(rec + 6 * part + 4)
        l2 = tl.load(rec + 6 * part + 5)
        for j in range(0, l0 + l1 + l2):
            tk = _run_tile(j, s0, l0, s1, l1, s2, l2)
            pos_k, mpos_k, valid_k = _slots(PERM, tk, N, BLOCK_N, PERMUTED, False)
            k = tl.load(k_base + pos_k[:, None] * s_kn + offs_d[None, :], mask=valid_k[:, None], other=0.0)
            v = tl.load(v_base + pos_k[:, None] * s_vn + offs_d[None, :], mask=valid_k[:, None], other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
            p = tl.exp2(s * qk_scale - m_q[:, None])
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
            ds = p * (dp - delta_q[:, None])
            if part == 1:
                allowed = _mask(mpos_q, rq, cq, mpos_k, T, S, KS, DIL, KIND)
                ds = tl.where(allowed, ds, 0.0)
                nonfinite = _nonfinite_rows(k)
                k = tl.where(nonfinite[:, None], 0.0, k)
                bad |= _sees_nonfinite(allowed, nonfinite)
            dq = _dot(ds.to(k.dtype), k, dq, IEEE)
    tl.store(DQ + b64 * s_dqb + h64 * s_dqh + pos_q[:, None] * s_dqn + offs_d[None, :],
             tl.where(bad[:, None], float("nan"), dq * sm_scale).to(DQ.dtype.element_ty),
             mask=valid_q[:, None])
