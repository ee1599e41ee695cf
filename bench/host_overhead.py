"""Host (CPU) time per call of the Triton backend of ``dalle_fast.sparse_attention``.

At DALL-E sizes one Triton forward takes well under 0.1 ms on a Hopper GPU, so the Python work
around each launch decides whether the GPU ever waits for the host. This measures that work.

    python bench/host_overhead.py                  # no GPU: kernel launches stubbed out
    python bench/host_overhead.py --device cuda    # GPU: real launches, tiny problem

Without a GPU (``--device cpu``), every Triton kernel launch is replaced by a stub that only counts
the launch, so the times are dalle_fast's own host path: argument checks, plan lookup, output
allocation, autograd, and the launch arguments, *without* Triton's launcher (its cost comes on
top, measured with ``--device cuda``). With a GPU the launches are real and the problem is small
(B=1, H=1) so that the GPU finishes each call before the host issues the next: host time is wall
time per call. SDPA ``is_causal=True`` is timed the same way for comparison.

Reports the median over ``--rounds`` rounds of ``--calls`` calls, in microseconds per call, for
forward under ``no_grad``, forward with autograd, backward alone, and forward + backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# _util first: it makes the installed dalle_fast importable, else this checkout's
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import check_at_least, check_cuda, machine  # noqa: E402
import dalle_fast  # noqa: E402
from dalle_fast import Layout  # noqa: E402
from dalle_fast import ops  # noqa: E402


class _Stub:
    """Stands in for a Triton kernel: ``stub[grid](*args, **meta)`` counts and returns."""

    def __init__(self, name, counts):
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1

        return launch


def stub_kernels(K, counts):
    """Replaces the kernel launches of module ``K`` by counting stubs and lets it plan CPU tensors."""
    K.INTERPRET = True  # check_inputs accepts CPU tensors; fixed (untuned) configurations
    for name in list(K.KERNELS):
        K.KERNELS[name] = _Stub(name, counts)
    # the hopper module's kernels too: the portable forward's repair launch (a pass over the row
    # flags) goes through them
    from dalle_fast.kernels import hopper as Kh
    for name in ("_fwd_hopper", "_bwd_delta", "_bwd_fused"):
        setattr(Kh, name, _Stub(name, counts))
    K.clear_caches()


def per_call_us(fn, calls, rounds, sync):
    for _ in range(max(calls // 10, 10)):
        fn()
    sync()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def cases(attn, q, k, v, grad):
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attn(qg, kg, vg)

    def fwd_nograd():
        with torch.no_grad():
            attn(q, k, v)

    return {
        "fwd (no_grad)": fwd_nograd,
        "fwd (autograd)": lambda: attn(qg, kg, vg),
        "bwd": lambda: torch.autograd.grad(out, (qg, kg, vg), grad, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(attn(qg, kg, vg), (qg, kg, vg), grad),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--kind", default="row", choices=dalle_fast.KINDS)
    p.add_argument("--batch", type=int, default=None, help="default 8 (cpu, stubbed) / 1 (cuda)")
    p.add_argument("--heads", type=int, default=None, help="default 16 (cpu, stubbed) / 1 (cuda)")
    p.add_argument("--head-dim", type=int, default=64, choices=ops.TRITON_HEAD_DIMS)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)

    check_cuda(p, args.device)
    check_at_least(p, args, 1, "--batch", "--heads", "--calls", "--rounds")
    if not ops.triton_available():
        p.error("triton is not installed")
    K = ops.triton_kernels()
    counts: dict = {}
    cuda = args.device == "cuda"
    if not cuda:
        stub_kernels(K, counts)
    B = args.batch if args.batch is not None else (1 if cuda else 8)
    H = args.heads if args.heads is not None else (1 if cuda else 16)
    layout = Layout(args.kind, 256, 32)
    N, D = layout.seq_len, args.head_dim
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, N, D, generator=gen).to(args.device, dtype) for _ in range(4))
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    providers = {"dalle_fast": lambda q, k, v: dalle_fast.sparse_attention(q, k, v, layout, backend="triton")}
    if cuda:
        providers["sdpa_causal"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    results = {}
    for pname, attn in providers.items():
        for cname, fn in cases(attn, q, k, v, grad).items():
            fn()  # plans the problem (and tunes, on a GPU)
            counts.clear()
            fn()
            launches = sum(counts.values())
            us = per_call_us(fn, args.calls, args.rounds, sync)
            results[(pname, cname)] = (us, launches)

    where = "kernel launches stubbed (dalle_fast's host path only)" if not cuda else "real launches"
    print(f"# host time per call, {machine(args.device)}; {where}")
    print(f"# {args.kind}, B={B}, H={H}, N={N}, D={D}, bfloat16, median of {args.rounds} x {args.calls} calls")
    print(f"{'provider':<12} {'call':<16} {'us/call':>9} {'launches':>9}")
    for (pname, cname), (us, launches) in results.items():
        shown = launches if not cuda else "-"
        print(f"{pname:<12} {cname:<16} {us:9.1f} {shown!s:>9}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        rows = [dict(provider=p_, call=c, us=us, launches=n) for (p_, c), (us, n) in results.items()]
        Path(args.out).write_text(json.dumps(dict(machine=machine(args.device), device=args.device, kind=args.kind,
                                                  B=B, H=H, N=N, D=D, stubbed=not cuda, rows=rows), indent=1))


if __name__ == "__main__":
    main()
