"""Benchmark the decode step's packed linear layer (dalle_fast.ops.LinearPack, CPU) against what a
user would call instead: torch's F.linear (its GEMM) and oneDNN's linear on a prepacked weight
(torch.ops.mkldnn._linear_pointwise, what Inductor emits with freezing), at decode-step shapes: a
few rows (the generation's rows) by a model's weight matrices.

    python bench/linear.py                  # rows 8 and 16 x the small preset's and a width-256 model's layers
    python bench/linear.py --quick          # two shapes (seconds)
    python bench/linear.py --isas all       # every instruction set of the packed kernel this CPU runs

Writes bench/out/linear.csv / linear.json (--out) with the machine.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# _util first: it makes the installed dalle_fast importable, else this checkout's
sys.path.insert(0, HERE)
from _util import check_at_least, machine, print_table, timeit, write_results  # noqa: E402
import dalle_fast  # noqa: E402
from dalle_fast.ops import LinearPack  # noqa: E402

# (in_features, out_features) of a dim-256 model's decode step: qkv, out, MLP in/out (x4), GEGLU in
# (x8), the head's 8192 image columns
SHAPES = [(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 2048), (256, 8192)]


def onednn():
    """oneDNN's prepacked linear where this torch has it (x86 builds), else None."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return None

    def make(w, b, rows):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    return make


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8,16", help="comma-separated row counts (default 8,16)")
    ap.add_argument("--quick", action="store_true", help="two shapes, one row count")
    ap.add_argument("--isas", default="best", help="'best' (the active instruction set) or 'all'")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"),
                    help="directory for linear.csv / linear.json (default: bench/out)")
    args = ap.parse_args(argv)
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
    except ValueError:
        ap.error(f"--rows must be comma-separated integers, got {args.rows!r}")
    if any(r < 1 for r in rows_list):
        ap.error(f"--rows must be >= 1, got {args.rows!r}")
    if args.isas not in ("best", "all"):
        ap.error(f"--isas must be 'best' or 'all', got {args.isas!r}")
    check_at_least(ap, args, 1, "--threads")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes, rows_list = (SHAPES[:2], rows_list[:1]) if args.quick else (SHAPES, rows_list)
    isas = dalle_fast.available_cpu_isas() if args.isas == "all" else [dalle_fast.cpu_isa()]
    make_onednn = onednn()
    print(machine("cpu"))
    g = torch.Generator().manual_seed(0)
    results = []
    for isa in isas:
        with dalle_fast.use_cpu_isa(isa):
            for rows in rows_list:
                for k, n in shapes:
                    x, w, b = (torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g),
                               torch.randn(n, generator=g))
                    pack = LinearPack(w, b)
                    flops = 2 * rows * k * n
                    t_ours = timeit(lambda: pack(x), "cpu")
                    t_torch = timeit(lambda: F.linear(x, w, b), "cpu")
                    row = dict(isa=isa, rows=rows, in_features=k, out_features=n, packed_us=round(t_ours * 1e6, 1),
                               packed_gflops=round(flops / t_ours / 1e9, 1), torch_us=round(t_torch * 1e6, 1),
                               speedup_vs_torch=round(t_torch / t_ours, 2))
                    if make_onednn is not None:
                        f = make_onednn(w, b, rows)
                        t_dnn = timeit(lambda: f(x), "cpu")
                        row.update(onednn_us=round(t_dnn * 1e6, 1), speedup_vs_onednn=round(t_dnn / t_ours, 2))
                    results.append(row)
    print_table(results, list(results[0].keys()))
    write_results(args.out, "linear", results, {"machine": machine("cpu"), "threads": torch.get_num_threads(),
                                                "onednn": make_onednn is not None})


if __name__ == "__main__":
    main()
