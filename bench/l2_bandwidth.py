"""Read bandwidth of the memory hierarchy, to set the attention kernels' L2 traffic against.

The tuning table of ``bench/attention.py`` gives every Triton candidate's L2 traffic as modelled
from its tile table (``l2_mb``) and the rate that traffic implies at its measured time (``l2_tbs``).
This measures what the machine delivers: repeated reads of one buffer, from sizes that stay in L2
(on a GPU; in the caches on a CPU) to sizes that stream from HBM (DRAM). If the fastest forward's
``l2_tbs`` sits near the L2-resident rate here, the forward is bound by L2 bandwidth and only
taller query tiles (fewer K/V reads) make it faster; if far below, by latency or issue.

    python bench/l2_bandwidth.py                   # CPU: torch.sum over each buffer
    python bench/l2_bandwidth.py --device cuda     # GPU: a Triton read kernel and torch.sum

On CUDA every launch reads the whole buffer ``reads_per_launch`` times (at least ~512 MB per launch,
so that an L2-sized buffer's ~1-5 us per read is not hidden behind the ~5-12 us Triton's launcher
takes per call) with 16-byte loads from ``--programs-per-sm`` programs per SM (8 warps each),
cached in L2 only (``.cg``: a program re-reading its slice must not be served by its SM's L1); the
buffer stays L2-resident between reads. ``torch.sum`` reads it once per launch, so at L2 sizes its
rate includes the launch overhead (a lower bound). Reports the median of 5 timed rounds in GB/s per
buffer size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import check_at_least, check_cuda, machine, timeit  # noqa: E402

BLOCK = 4096  # float32 elements per program and iteration: 16 per thread of 8 warps (4 x 16 B loads)
BYTES_PER_LAUNCH = 512e6  # what one timed launch reads at least (~0.1 ms at L2 rates)


def reads_per_launch(nbytes: int) -> int:
    """How many times one launch of the read kernel reads a buffer of ``nbytes``: enough that the
    launch moves ``BYTES_PER_LAUNCH``, so that its GPU time, not the host's launch rate, is timed."""
    return max(1, math.ceil(BYTES_PER_LAUNCH / nbytes))


def rounded_gbps(gbps: float) -> float:
    """GB/s to one decimal, below 1 GB/s to two significant digits: a slow reading (a busy CPU's
    0.03 GB/s) must not be reported as 0."""
    return round(gbps, 1) if gbps >= 1 else float(f"{gbps:.2g}")


def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read(X, OUT, per_program, reps, BLOCK: tl.constexpr):
        base = X + tl.program_id(0).to(tl.int64) * per_program
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(0, reps):
            for i in range(0, per_program, BLOCK):
                acc += tl.load(base + i + tl.arange(0, BLOCK), cache_modifier=".cg")
        tl.store(OUT + tl.program_id(0), tl.sum(acc))  # keeps the loads live

    return read


def measure(size_mb: float, device: str, programs_per_sm: int, kernel=None):
    """[(method, GB/s)] for reads of a float32 buffer of about ``size_mb`` MB."""
    results = []
    if device == "cuda":
        programs = torch.cuda.get_device_properties(0).multi_processor_count * programs_per_sm
        per_program = max(1, round(size_mb * 1e6 / 4 / programs / BLOCK)) * BLOCK
        x = torch.rand(programs * per_program, device=device)
        out = torch.empty(programs, device=device)
        nbytes = x.numel() * 4
        reps = reads_per_launch(nbytes)
        seconds = timeit(lambda: kernel[(programs,)](x, out, per_program, reps, BLOCK=BLOCK, num_warps=8), device)
        results.append(("triton read", reps * nbytes / seconds / 1e9))
        # the launch is right: its partial sums add up to reps times the buffer's sum
        if not torch.allclose(out.double().sum(), reps * x.double().sum(), rtol=1e-4):
            raise RuntimeError("the read kernel's sums do not match torch.sum: the measurement is void")
    else:
        x = torch.rand(max(1, round(size_mb * 1e6 / 4)), device=device)
        nbytes = x.numel() * 4
    seconds = timeit(lambda: torch.sum(x), device)
    results.append(("torch.sum", nbytes / seconds / 1e9))
    return nbytes, results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes-mb", default=None,
                   help="comma list of buffer sizes in MB (default: 8,16,24,32,1024 on CUDA, 0.5,4,32,512 on CPU)")
    p.add_argument("--programs-per-sm", type=int, default=4, help="CUDA: programs of the read kernel per SM")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    check_cuda(p, args.device)
    check_at_least(p, args, 1, "--programs-per-sm")
    spec = args.sizes_mb if args.sizes_mb is not None else ("8,16,24,32,1024" if args.device == "cuda"
                                                           else "0.5,4,32,512")
    try:
        sizes = [float(s) for s in spec.split(",")]
    except ValueError:
        p.error(f"--sizes-mb must be a comma list of numbers, got {spec!r}")
    if not all(0 < s < math.inf for s in sizes):  # also refuses nan
        p.error(f"--sizes-mb must be positive and finite, got {spec!r}")

    kernel = _read_kernel() if args.device == "cuda" else None
    l2_mb = None
    if args.device == "cuda":
        l2_mb = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) / 2**20 or None
    name = machine(args.device)
    print(f"# read bandwidth on {name}" + (f", L2 {l2_mb:.0f} MiB" if l2_mb else ""))
    print(f"{'buffer MB':>10} {'method':<12} {'GB/s':>10}")
    rows = []
    for size in sizes:
        nbytes, results = measure(size, args.device, args.programs_per_sm, kernel)
        for method, gbps in results:
            rows.append(dict(size_mb=round(nbytes / 1e6, 2), method=method, gbps=rounded_gbps(gbps)))
            print(f"{nbytes / 1e6:>10.1f} {method:<12} {rounded_gbps(gbps):>10g}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(machine=name, device=args.device, l2_cache_mib=l2_mb, rows=rows), f, indent=1)
        print(f"# wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
