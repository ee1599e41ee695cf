"""Launch plans of the Hopper kernels (:mod:`.hopper`): segment records, work order, grid, descriptors.

A layout *fits* the segment walk when, for every query tile (forward, deterministic dQ) and every
key tile (backward), the partner tiles that need no element mask form at most three runs of
consecutive tiles, and so do the ones that need a mask (checked per (layout, seq_len, tile shape)
from ``Layout.tile_table``; ``conv_like`` with dilation > 1 does not fit and keeps the table-driven
kernels of :mod:`.sparse_attention`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton

from ..masks import Layout
from . import hopper as Kh

try:  # TMA tensor descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None


class FwdConfig(NamedTuple):
    block_m: int  # query rows per work item (two halves)
    block_n: int  # keys per streamed tile
    num_warps: int  # per consumer warpgroup when warp-specialised
    num_stages: int
    programs_per_sm: int


class BwdConfig(NamedTuple):
    block_m: int  # query rows per step
    block_n: int  # keys per program (two halves)
    num_warps: int
    num_stages: int
    programs_per_sm: int


def fwd_config(head_dim: int, interpret: bool) -> FwdConfig:
    if interpret:  # small tiles: several tiles per sequence at test sizes
        return FwdConfig(32, 16, 4, 1, 1)
    return FwdConfig(128, 64, 4, 2, 1)


def bwd_config(head_dim: int, interpret: bool) -> BwdConfig:
    if interpret:
        return BwdConfig(16, 32, 4, 1, 1)
    return BwdConfig(32, 128, 8, 1, 1)


class Segments(NamedTuple):
    records: torch.Tensor  # (tiles * SEG_INTS,) int32
    order: torch.Tensor  # (tiles,) int32, heaviest first


def _runs(tiles: torch.Tensor) -> Optional[list]:
    """``[(start, length), ...]`` of the ascending tile list, or None if over SEG_RUNS runs."""
    runs = []
    for t in tiles.tolist():
        if runs and runs[-1][0] + runs[-1][1] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    if len(runs) > Kh.SEG_RUNS:
        return None
    return runs + [[0, 0]] * (Kh.SEG_RUNS - len(runs))


@functools.lru_cache(maxsize=256)
def segments(layout: Layout, seq_len: int, block_m: int, block_n: int, transpose: bool) -> Optional[Segments]:
    """Segment records of the query tiles (``transpose`` False) or key tiles (True) of the tile table
    at ``block_m`` x ``block_n``, on the CPU; None when some tile needs more than three runs."""
    tt = layout.tile_table(seq_len, block_m, block_n)
    row_ptr, col_idx, num_full = ((tt.t_row_ptr, tt.t_col_idx, tt.t_num_full) if transpose
                                  else (tt.row_ptr, tt.col_idx, tt.num_full))
    records, cost = [], []
    for i in range(row_ptr.numel() - 1):
        row = col_idx[int(row_ptr[i]):int(row_ptr[i + 1])]
        nf = int(num_full[i])
        full, part = _runs(row[:nf]), _runs(row[nf:])
        if full is None or part is None:
            return None
        records.extend(x for run in full + part for x in run)
        cost.append(2 * nf + 3 * (row.numel() - nf))  # a masked tile costs about 1.5 full ones
    order = sorted(range(len(cost)), key=lambda i: -cost[i])
    return Segments(torch.tensor(records, dtype=torch.int32), torch.tensor(order, dtype=torch.int32))


@functools.lru_cache(maxsize=256)
def superset_segments(layout: Layout, seq_len: int, block_m: int, block_n: int, transpose: bool) -> Segments:
    """Records that fit every layout: per tile one masked run from its first to its last partner tile
    (a superset of the tiles it needs, each masked element by element). For the repair passes, which
    run only where an output came out non-finite."""
    tt = layout.tile_table(seq_len, block_m, block_n)
    row_ptr, col_idx = (tt.t_row_ptr, tt.t_col_idx) if transpose else (tt.row_ptr, tt.col_idx)
    records = []
    for i in range(row_ptr.numel() - 1):
        row = col_idx[int(row_ptr[i]):int(row_ptr[i + 1])]
        first, last = (int(row.min()), int(row.max())) if row.numel() else (0, -1)
        records.extend([0, 0] * Kh.SEG_RUNS + [first, last - first + 1] + [0, 0] * (Kh.SEG_RUNS - 1))
    n = row_ptr.numel() - 1
    return Segments(torch.tensor(records, dtype=torch.int32), torch.arange(n, dtype=torch.int32))


def _repair_segments(layout, seq_len, block_m, block_n, transpose, device) -> Segments:
    seg = segments(layout, seq_len, block_m, block_n, transpose)
    key = (layout, seq_len, block_m, block_n, transpose)
    if seg is None:
        seg, key = superset_segments(layout, seq_len, block_m, block_n, transpose), key + ("superset",)
    return _on(seg, key, device)


def fits(layout: Layout, seq_len: int, head_dim: int, interpret: bool = False) -> bool:
    """Whether the Hopper kernels serve this (layout, seq_len): every table fits the segment walk."""
    f, b = fwd_config(head_dim, interpret), bwd_config(head_dim, interpret)
    return all(segments(layout, seq_len, *shape) is not None for shape in (
        (f.block_m, f.block_n, False), (b.block_m, b.block_n, True), (b.block_m, b.block_n, False)))


_DEVICE_SEGMENTS: dict = {}


def _on(seg: Segments, key, device):
    hit = _DEVICE_SEGMENTS.get((key, str(device)))
    if hit is None:
        hit = _DEVICE_SEGMENTS[(key, str(device))] = Segments(seg.records.to(device), seg.order.to(device))
    return hit


def device_segments(layout, seq_len, block_m, block_n, transpose, device) -> Segments:
    seg = segments(layout, seq_len, block_m, block_n, transpose)
    if seg is None:
        raise ValueError(f"{layout} at seq_len {seq_len} does not fit the segment walk at {block_m} x {block_n}")
    return _on(seg, (layout, seq_len, block_m, block_n, transpose), device)


_PERM: dict = {}


def device_perm(layout: Layout, seq_len: int, device) -> tuple:
    """``(perm int32 on device, permuted)``."""
    key = (layout, seq_len, str(device))
    hit = _PERM.get(key)
    if hit is None:
        perm = layout.permutation(seq_len)
        hit = _PERM[key] = (perm.to(torch.int32).to(device), not torch.equal(perm, torch.arange(seq_len)))
    return hit


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether 4-D TMA descriptors can address these (B, H, N, D) tensors: CUDA, 16-byte aligned
    base, unit last stride, other strides multiples of 16 bytes."""
    if TensorDescriptor is None:
        return False
    for t in tensors:
        es = t.element_size()
        if t.device.type != "cuda" or t.stride(3) != 1 or t.data_ptr() % 16:
            return False
        if any((s * es) % 16 for s in t.stride()[:3]):
            return False
    return True


def descriptor(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[3]])


#: (dtype, head_dim, kind id) -> why this Triton refused to warp-specialise the forward; those
#: launches run without warp specialisation (a RuntimeWarning says so once)
WS_REFUSED: dict = {}
_COMPILE_ERRORS = (RuntimeError, triton.CompilationError)


def _ws_refused(dtype, head_dim, kind, error) -> None:
    import warnings

    reason = str(error).strip().splitlines()[-1][:200] if str(error).strip() else type(error).__name__
    WS_REFUSED[(dtype, head_dim, kind)] = reason
    warnings.warn(f"Triton {triton.__version__} could not warp-specialise the hopper forward ({reason}); "
                  "running it without warp specialisation", RuntimeWarning, stacklevel=3)


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, each walking several work items


def forward(q, k, v, layout: Layout, scale: float, interpret: bool, warp_specialize: Optional[bool] = None):
    """Hopper forward: ``(out (B, H, N, D) contiguous, lse (B, H, N) float32)``."""
    B, H, N, D = q.shape
    cfg = fwd_config(D, interpret)
    seg = device_segments(layout, N, cfg.block_m, cfg.block_n, False, q.device)
    perm, permuted = device_perm(layout, N, q.device)
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    BH = B * H
    n_items = seg.order.numel() * BH
    if n_items == 0:
        return out, lse
    tma = not permuted and tma_ready(q, k, v)
    ws = tma and (warp_specialize if warp_specialize is not None else True)
    ws = ws and (q.dtype, D, layout.kind_id) not in WS_REFUSED
    if tma:
        dq_, dk_, dv_ = descriptor(q, cfg.block_m // 2), descriptor(k, cfg.block_n), descriptor(v, cfg.block_n)
    else:
        dq_, dk_, dv_ = q, k, v
    kind, T, S, KS, DIL = layout.params()
    flags = torch.empty((B, H, N), dtype=torch.int8, device=q.device)
    args = (q, k, v, out, lse, perm, seg.records, seg.order, flags,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            n_items, BH, H, N, T, S, KS, DIL, scale * Kh.LOG2E.value)
    meta = dict(KIND=kind, PERMUTED=permuted, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                IEEE=q.dtype == torch.float32, num_stages=cfg.num_stages)
    grid = (min(n_items, _sm_count(q.device) * cfg.programs_per_sm),)
    # warp-specialised: num_warps per consumer warpgroup (Triton adds the producer); else one warpgroup
    # per query half
    try:
        Kh._fwd_hopper[grid](dq_, dk_, dv_, *args, TMA=tma, WS=ws, SAFE=False, FIXUP=False,
                             num_warps=cfg.num_warps if ws else 2 * cfg.num_warps, **meta)
    except _COMPILE_ERRORS as e:
        if not ws or not (isinstance(e, triton.CompilationError) or "PassManager" in str(e)):
            raise
        # this Triton cannot warp-specialise the loop: the same kernel without it, said once
        _ws_refused(q.dtype, D, kind, e)
        Kh._fwd_hopper[grid](dq_, dk_, dv_, *args, TMA=tma, WS=False, SAFE=False, FIXUP=False,
                             num_warps=2 * cfg.num_warps, **meta)
    repair_forward(q, k, v, out, lse, flags, layout, scale, interpret)
    return out, lse


def repair_forward(q, k, v, out, lse, flags, layout: Layout, scale: float, interpret: bool) -> None:
    """Recompute, in place, the query tiles of ``out``/``lse`` holding a row flagged in ``flags``
    (B, H, N) int8 (a non-finite output row), with non-finite values the mask hides from a query kept
    out of its P V (the forward kernels' matrix products would multiply them by a zero weight, and
    0 * nan is nan). Where nothing is flagged it reads the flags and returns."""
    B, H, N, D = q.shape
    if B * H * N == 0:
        return
    cfg = fwd_config(D, interpret)
    seg = _repair_segments(layout, N, cfg.block_m, cfg.block_n, False, q.device)
    perm, permuted = device_perm(layout, N, q.device)
    BH = B * H
    n_items = seg.order.numel() * BH
    kind, T, S, KS, DIL = layout.params()
    grid = (min(n_items, _sm_count(q.device) * cfg.programs_per_sm),)
    Kh._fwd_hopper[grid](
        q, k, v, q, k, v, out, lse, perm, seg.records, seg.order, flags,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        n_items, BH, H, N, T, S, KS, DIL, scale * Kh.LOG2E.value,
        KIND=kind, PERMUTED=permuted, TMA=False, WS=False, SAFE=True, FIXUP=True, HEAD_DIM=D,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IEEE=q.dtype == torch.float32, num_warps=2 * cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def repair_dq(q, k, v, grad_out, lse, delta, dq, flags, layout: Layout, scale: float, interpret: bool) -> None:
    """Recompute, in place, the query tiles of ``dq`` holding a row flagged in ``flags`` (a non-finite
    dQ row), with masked-out non-finite keys and values kept out of dP and dS K. ``delta``: rowsum(dO *
    O) - dlse as the backward computed it. Where nothing is flagged it reads the flags and returns."""
    B, H, N, D = q.shape
    if B * H * N == 0:
        return
    cfg = bwd_config(D, interpret)
    seg = _repair_segments(layout, N, cfg.block_m, cfg.block_n, False, q.device)
    perm, permuted = device_perm(layout, N, q.device)
    BH = B * H
    n_q = seg.order.numel() * BH
    kind, T, S, KS, DIL = layout.params()
    grid = (min(n_q, _sm_count(q.device) * cfg.programs_per_sm),)
    Kh._bwd_fused[grid](
        q, k, v, grad_out, lse, delta, delta, dq, dq, dq, flags, perm, seg.records, seg.order, seg.records,
        seg.order,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        0, n_q, BH, H, N, T, S, KS, DIL, scale * Kh.LOG2E.value, scale,
        KIND=kind, PERMUTED=permuted, DETERMINISTIC=True, FIXUP=True, HEAD_DIM=D,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def backward(grad_out, q, k, v, out, lse, layout: Layout, scale: float, interpret: bool,
             grad_lse=None, deterministic: Optional[bool] = None):
    """Hopper backward: ``(dq, dk, dv)``, each ``(B, H, N, D)`` contiguous in q's dtype. dQ through
    float32 atomics, or (``deterministic``; default ``torch.are_deterministic_algorithms_enabled()``)
    from query-tile programs of the same launch."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    B, H, N, D = q.shape
    cfg = bwd_config(D, interpret)
    kseg = device_segments(layout, N, cfg.block_m, cfg.block_n, True, q.device)
    qseg = device_segments(layout, N, cfg.block_m, cfg.block_n, False, q.device)
    perm, permuted = device_perm(layout, N, q.device)
    BH = B * H
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    dk = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    if deterministic:
        dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
        dq_acc = delta  # unused
    else:
        dq_acc = torch.empty((B, H, N, D), dtype=torch.float32, device=q.device)
        dq = dq_acc
    if BH == 0 or N == 0:
        return dq.to(q.dtype), dk, dv
    rows = 64
    Kh._bwd_delta[(triton.cdiv(N, rows), BH)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta, dq_acc,
        out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        H, N, HAS_DLSE=grad_lse is not None, ZERO_DQ=not deterministic, HEAD_DIM=D, BLOCK=rows,
    )
    n_kv = kseg.order.numel() * BH
    n_q = qseg.order.numel() * BH if deterministic else 0
    kind, T, S, KS, DIL = layout.params()
    grid = (min(n_kv + n_q, _sm_count(q.device) * cfg.programs_per_sm),)
    Kh._bwd_fused[grid](
        q, k, v, grad_out, lse, delta, dq_acc, dq, dk, dv, delta, perm, kseg.records, kseg.order, qseg.records,
        qseg.order,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        n_kv, n_q, BH, H, N, T, S, KS, DIL, scale * Kh.LOG2E.value, scale,
        KIND=kind, PERMUTED=permuted, DETERMINISTIC=deterministic, FIXUP=False, HEAD_DIM=D,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not deterministic and q.dtype != torch.float32:
        dq = dq_acc.to(q.dtype)
    return dq, dk, dv
