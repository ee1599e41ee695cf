"""Two models of the Triton kernels, no GPU: how much their program order should matter (list
scheduling), and how many bytes a forward moves through L2.

Each program of a kernel handles one table row (forward and dQ: a query tile's key tiles; dK/dV: a
key tile's query tiles) and is modelled as costing its row length plus ``--overhead`` tiles
(prologue, pipeline fill, epilogue). The GPU is modelled as ``--sms`` x ``programs per SM`` slots
that take the programs in grid order, each the moment a slot frees (how the block scheduler hands
out blocks when they are all alike in resources). The makespan is printed relative to the ideal
(total cost / slots) for the two orders of ``TileConfig.order``:

    o0  batch*head-major: every tile of batch*head 0 (heaviest first), then of 1, ...
    o1  tile-major: the heaviest tile of every batch*head, then the next, ...

What it leaves out: L2 reuse (o1 spreads the programs that share K/V or Q/dO over a whole wave),
memory bandwidth, and that real tiles do not all cost the same. It says where a tail is to be
expected, not what the GPU will measure.

The L2 table gives, per kind, the bytes one forward reads from and writes to L2 at this shape
(bfloat16) for both forward kernels, from their tile tables (``bench/attention.py``'s
``l2_traffic``: each query tile reads its q once, each (query tile, key tile) pair reads that key
tile's K and V, out and lse are written once; nothing is served from L1 or shared memory across
query tiles). The portable forward runs 64-row query tiles (64 x 64, its default), so each query
tile re-reads its text and band K/V; the Hopper forward walks the same table at 128-row query tiles
with 64 or 128 keys per step. ``us @ TB/s``: the time that traffic takes at ``--l2-tbs`` (an L2-bound
floor for the forward; ``bench/l2_bandwidth.py`` measures the rate).

    python bench/schedule_model.py                      # the benchmark's shape, B*H = 128
    python bench/schedule_model.py --bh 48 --kinds row,full
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import dalle_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
from dalle_fast import KINDS, Layout  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import check_at_least, check_finite, comma_list  # noqa: E402
from attention import l2_reads_writes  # noqa: E402

#: (kernel, BLOCK_M, BLOCK_N, programs per SM) of the bfloat16 head_dim-64 defaults on sm_90a, from
#: their registers and shared memory against an SM's 64K registers and 227 KiB (bench/kernel_resources.py;
#: the counts are in bench/RESULTS.md)
KERNELS = (("fwd", 64, 64, 3), ("dq", 128, 32, 2), ("dkdv", 32, 128, 1))


#: (kernel, BLOCK_M, BLOCK_N) of the forwards whose L2 traffic is modelled: the portable forward at its
#: bfloat16 head_dim-64 default, the Hopper forward at both key-step widths
L2_FORWARDS = (("portable", 64, 64), ("hopper", 128, 64), ("hopper", 128, 128))


def forward_l2(layout: Layout, seq: int, bh: int, head_dim: int, block_m: int, block_n: int,
               elem_bytes: int = 2) -> dict:
    """Modelled L2 traffic of one forward over ``bh`` batch*heads at tiles ``block_m`` x ``block_n``:
    bytes ``read`` (q, K, V), ``written`` (out, lse), their ``total`` and the tile ``pairs`` per head."""
    table = layout.tile_table(seq, block_m, block_n)
    read, written = l2_reads_writes("fwd", table, head_dim, elem_bytes, bh)
    return dict(read=read, written=written, total=read + written, pairs=table.nnz)


def makespan(costs, slots: int) -> float:
    """Finish time of list scheduling ``costs`` in order on ``slots`` identical slots."""
    free = [0.0] * slots
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def row_lengths(layout: Layout, seq: int, kernel: str, block_m: int, block_n: int) -> list:
    table = layout.tile_table(seq, block_m, block_n)
    ptr = table.t_row_ptr if kernel == "dkdv" else table.row_ptr
    return [int(ptr[i + 1] - ptr[i]) for i in range(len(ptr) - 1)]


def model(layout: Layout, seq: int, bh: int, kernel: str, block_m: int, block_n: int, per_sm: int,
          sms: int, overhead: float) -> dict:
    """Makespans over the ideal of both program orders (``o0``, ``o1``) for one kernel."""
    costs = [overhead + n for n in row_lengths(layout, seq, kernel, block_m, block_n)]
    # each batch*head's tiles heaviest first, as the kernels walk them (_program): query tiles
    # descending, key tiles ascending
    tiles = list(range(len(costs))) if kernel == "dkdv" else list(reversed(range(len(costs))))
    slots = sms * per_sm
    ideal = sum(costs) * bh / slots
    o0 = makespan([costs[t] for _ in range(bh) for t in tiles], slots) / ideal
    o1 = makespan([costs[t] for t in tiles for _ in range(bh)], slots) / ideal
    return dict(kernel=kernel, block_m=block_m, block_n=block_n, per_sm=per_sm, o0=o0, o1=o1,
                rows=f"{min(costs) - overhead:.0f}-{max(costs) - overhead:.0f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="row,col,conv,full")
    p.add_argument("--bh", type=int, default=128, help="batch * heads (default 8 x 16)")
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--sms", type=int, default=132, help="SMs (H100 SXM: 132)")
    p.add_argument("--overhead", type=float, default=1.5, help="per-program cost in tiles")
    p.add_argument("--head-dim", type=int, default=64, help="L2 model: head_dim (bfloat16)")
    p.add_argument("--l2-tbs", type=float, default=5.5, help="L2 model: L2 read rate in TB/s for the time column")
    args = p.parse_args(argv)
    check_at_least(p, args, 1, "--bh", "--text-len", "--image-size", "--sms", "--head-dim")
    check_finite(p, args, "--overhead", "--l2-tbs")
    if args.overhead < 0:
        p.error(f"--overhead must be >= 0, got {args.overhead}")
    if args.l2_tbs <= 0:
        p.error(f"--l2-tbs must be > 0, got {args.l2_tbs}")
    kinds = comma_list(p, "--kinds", args.kinds, KINDS)
    print(f"# list-scheduling model: B*H={args.bh}, {args.sms} SMs, {args.overhead} tiles of overhead per program; "
          "makespan / ideal (1.00 = no tail)")
    print(f"{'kind':<6} {'kernel':<6} {'tile':>8} {'per SM':>6} {'row len':>8} {'o0':>6} {'o1':>6} {'o0 / o1':>8}")
    results = []
    for kind in kinds:
        layout = Layout(kind, args.text_len, args.image_size)
        for kernel, bm, bn, per_sm in KERNELS:
            r = model(layout, layout.seq_len, args.bh, kernel, bm, bn, per_sm, args.sms, args.overhead)
            r["kind"] = kind
            results.append(r)
            print(f"{kind:<6} {kernel:<6} {f'{bm}x{bn}':>8} {per_sm:>6} {r['rows']:>8} {r['o0']:>6.3f} {r['o1']:>6.3f} "
                  f"{r['o0'] / r['o1']:>7.3f}x")
    print()
    seq = args.text_len + args.image_size ** 2
    print(f"# modelled L2 traffic per forward: bfloat16, B*H={args.bh}, D={args.head_dim}, N={seq} "
          f"(text {args.text_len} + {args.image_size}x{args.image_size}); MB = 1e6 bytes")
    print(f"{'kind':<10} {'forward':<9} {'tile':>8} {'pairs':>6} {'read MB':>9} {'write MB':>9} {'total MB':>9} "
          f"{f'us @ {args.l2_tbs:g} TB/s':>15}")
    for kind in kinds:
        layout = Layout(kind, args.text_len, args.image_size)
        for name, bm, bn in L2_FORWARDS:
            r = forward_l2(layout, seq, args.bh, args.head_dim, bm, bn)
            results.append(dict(kind=kind, kernel=f"fwd_{name}", block_m=bm, block_n=bn, **r))
            print(f"{kind:<10} {name:<9} {f'{bm}x{bn}':>8} {r['pairs']:>6} {r['read'] / 1e6:>9.1f} "
                  f"{r['written'] / 1e6:>9.1f} {r['total'] / 1e6:>9.1f} {r['total'] / (args.l2_tbs * 1e6):>15.1f}")
    return results


if __name__ == "__main__":
    main()
