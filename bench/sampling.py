"""Benchmark dalle_fast.sample against the torch composition a user would write instead.

Baseline (same filtering): guidance mix, vocab slice, temperature, torch.topk (or torch.sort when
there is no top-k) + softmax + cumsum top-p mask + torch.multinomial + gather.

    python bench/sampling.py --device cuda --quick   # writes bench/out/sampling.csv / sampling.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# _util first: it makes the installed dalle_fast importable, else this checkout's
sys.path.insert(0, HERE)
from _util import check_cuda, machine, print_table, timeit, write_results  # noqa: E402
import dalle_fast  # noqa: E402

CONFIGS = {  # name -> (top_k, top_p)
    "topk256+topp0.95": (256, 0.95),
    "topp0.9": (0, 0.9),
    "topk_half": (-2, 1.0),  # top_k = V // 2 (DALLE-pytorch filter_thres=0.5)
}


def torch_sample(c, u, cfg, temperature, top_k, top_p, lo, hi):
    x = u + cfg * (c - u)
    x = x[:, lo:hi].float() / temperature
    if top_k > 0:
        vals, idx = torch.topk(x, top_k, dim=1)
    else:
        vals, idx = torch.sort(x, dim=1, descending=True)
    probs = torch.softmax(vals, dim=1)
    if top_p < 1.0:
        keep = (torch.cumsum(probs, dim=1) - probs) < top_p
        probs = probs * keep
    choice = torch.multinomial(probs, 1)
    return idx.gather(1, choice).squeeze(1) + lo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small sweep (< 60 s on a GPU)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"),
                    help="directory for sampling.csv / sampling.json (default: bench/out)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    check_cuda(ap, args.device)
    dev = args.device
    dtype = getattr(torch, args.dtype)
    vocabs = [8192, 24576]
    batches = [1, 64] if args.quick else [1, 8, 64, 256]
    configs = ["topk256+topp0.95", "topp0.9"] if args.quick else list(CONFIGS)
    print(machine(dev))
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for V in vocabs:
        for B in batches:
            c = torch.randn(B, V, device=dev, generator=g, dtype=torch.float32).mul_(3).to(dtype)
            u = torch.randn(B, V, device=dev, generator=g, dtype=torch.float32).mul_(3).to(dtype)
            seeds = torch.arange(B, device=dev)
            step = torch.zeros((), dtype=torch.long, device=dev)
            lo, hi = 0, V
            for name in configs:
                top_k, top_p = CONFIGS[name]
                if top_k == -2:
                    top_k = V // 2
                kw = dict(seeds=seeds, step=step, temperature=1.0, top_k=top_k, top_p=top_p, uncond_logits=u,
                          cfg_scale=3.0, vocab_range=(lo, hi))
                t_ours = timeit(lambda: dalle_fast.sample(c, **kw), dev)
                t_torch = timeit(lambda: torch_sample(c, u, 3.0, 1.0, top_k, top_p, lo, hi), dev)
                rows.append(dict(vocab=V, batch=B, filter=name, dtype=args.dtype, ours_us=round(t_ours * 1e6, 1),
                                 torch_us=round(t_torch * 1e6, 1), speedup=round(t_torch / t_ours, 2)))
                print_table(rows[-1:], list(rows[-1].keys())) if len(rows) == 1 else print(
                    "  ".join(str(v) for v in rows[-1].values()))
    print()
    print_table(rows, list(rows[0].keys()))
    write_results(args.out, "sampling", rows, {"machine": machine(dev), "device": dev, "quick": args.quick})


if __name__ == "__main__":
    main()
