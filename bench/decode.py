"""Benchmark dalle_fast.decode_attention against dense SDPA over the cached prefix.

Baseline: write k_new/v_new into the cache (index_copy_) + F.scaled_dot_product_attention of the
query over the whole cached prefix (what a dense KV-cached decoder does). Reported GB/s count the
bytes decode_attention must read: the allowed K and V rows (text once per prompt in the shared
best-of-N rows), q, k_new, v_new, plus the output and cache writes. On CUDA each call is timed
twice: through the op (``*_us``: back-to-back calls, host work included) and kernel-only
(``*_kernel_us``: the calls captured in a CUDA graph, replays timed), with the kernel-only rate as a
share of the card's HBM bandwidth (``--hbm-tbs``, else the data sheet's for known cards).

    python bench/decode.py --device cuda --quick     # writes bench/out/decode.csv / decode.json
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
from _util import check_at_least, check_cuda, graph_time_ms, machine, print_table, timeit, write_results  # noqa: E402
import dalle_fast  # noqa: E402
from dalle_fast.ops import CUDA_HEAD_DIMS  # noqa: E402


#: data-sheet HBM bandwidth (TB/s) of the cards the targets are stated for, by a substring of the name
HBM_TBS = {"H200": 4.8, "H100 SXM": 3.35, "H100 80GB HBM3": 3.35, "H100 NVL": 3.9, "H100 PCIe": 2.0,
           "A100-SXM4-80GB": 2.039, "A100 80GB PCIe": 1.935, "A100-SXM4-40GB": 1.555, "A100-PCIE-40GB": 1.555}


def hbm_tbs(name: str):
    """The data-sheet HBM bandwidth of the card called ``name`` (TB/s), or None when not known."""
    return next((tbs for key, tbs in HBM_TBS.items() if key in name), None)


def must_read_bytes(layout, pos, B, H, D, elem, prompts=None):
    keys = layout.decode_keys(pos)
    T = layout.text_len
    n_text = int((keys < T).sum())
    n_img = keys.numel() - n_text
    text_rows = (prompts if prompts is not None else B) * n_text
    kv = (text_rows + B * n_img) * H * D * 2 * elem
    return kv + B * H * D * elem * 6  # q, k_new, v_new read; out, k/v cache entries written


def kernel_times(cases, peak_tbs):
    """Kernel-only columns of one row: for each ``name: (fn, through-the-op seconds, bytes or None)``,
    ``name_kernel_us`` (CUDA graph) and, with bytes, ``name_kernel_GBps`` and, with a known HBM
    bandwidth, ``name_hbm_pct``. A case that cannot be captured gets None with the reason printed."""
    out = {}
    for name, (fn, op_s, nbytes) in cases.items():
        try:
            s = graph_time_ms(fn, repeats=10, op_ms=op_s * 1e3) / 1e3
        except Exception as e:  # noqa: BLE001 - reported, the row keeps its through-the-op time
            print(f"# {name}: no kernel-only time (CUDA-graph capture failed: {type(e).__name__}: {e})")
            torch.cuda.synchronize()
            s = None
        out[f"{name}_kernel_us"] = round(s * 1e6, 1) if s else None
        if nbytes is not None:
            out[f"{name}_kernel_GBps"] = round(nbytes / s / 1e9, 1) if s else None
            if peak_tbs:
                out[f"{name}_hbm_pct"] = round(100 * nbytes / s / (peak_tbs * 1e12), 1) if s else None
    return out


def hbm_lines(rows):
    """One line per kind for the largest batch at the last position: the kernel-only time and share
    of HBM bandwidth of the plain and the shared-text call (rows without kernel columns: none)."""
    timed = [r for r in rows if r.get("ours_kernel_us") is not None]
    if not timed:
        return []
    B, last = max(r["batch"] for r in timed), max(r["pos"] for r in timed)
    lines = []
    for r in timed:
        if r["batch"] == B and r["pos"] == last:
            parts = [f"{name} {r[f'{name}_kernel_us']} us, {r[f'{name}_kernel_GBps']} GB/s"
                     + (f" = {r[f'{name}_hbm_pct']}% of HBM" if r.get(f"{name}_hbm_pct") is not None else "")
                     for name in ("ours", "shared") if r.get(f"{name}_kernel_us") is not None]
            lines.append(f"decode attention kernel, B={B}, {r['kind']} at position {last}: " + "; ".join(parts))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small sweep (< 60 s on a GPU)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"),
                    help="directory for decode.csv / decode.json (default: bench/out)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=8, help="best-of-N candidates per prompt (shared rows)")
    ap.add_argument("--hbm-tbs", type=float, default=None,
                    help="the card's HBM bandwidth in TB/s for the %%-of-HBM columns (default: the data "
                         "sheet's for known cards)")
    args = ap.parse_args(argv)
    if args.hbm_tbs is not None and not args.hbm_tbs > 0:
        ap.error(f"--hbm-tbs must be > 0, got {args.hbm_tbs}")
    check_cuda(ap, args.device)
    check_at_least(ap, args, 1, "--heads", "--head-dim", "--text-len", "--image-size", "--candidates")
    if args.device == "cuda" and args.head_dim not in CUDA_HEAD_DIMS:
        ap.error(f"--head-dim: the CUDA decode kernel serves {', '.join(map(str, CUDA_HEAD_DIMS))}, "
                 f"got {args.head_dim}")
    dev = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev == "cuda" else "float32"))
    elem = torch.tensor([], dtype=dtype).element_size()
    H, D, T, S = args.heads, args.head_dim, args.text_len, args.image_size
    if dev == "cuda":
        batches = [1, 64] if args.quick else [1, 8, 64, 256]
    else:
        batches = [16] if args.quick else [1, 16, 64]
    kinds = ["row", "col", "conv", "full"] if args.quick else list(dalle_fast.KINDS)
    N = T + S * S
    peak = args.hbm_tbs or (hbm_tbs(torch.cuda.get_device_name()) if dev == "cuda" else None)
    print(machine(dev))
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for B in batches:
        kc = torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=g)
        vc = torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=g)
        q, kn, vn = (torch.randn(B, H, 1, D, device=dev, dtype=dtype, generator=g) for _ in range(3))
        P = max(1, B // args.candidates)
        prompt_index = torch.arange(B, device=dev) * P // B
        tk = torch.randn(P, H, T, D, device=dev, dtype=dtype, generator=g)
        tv = torch.randn(P, H, T, D, device=dev, dtype=dtype, generator=g)
        ik, iv = kc[:, :, T:].contiguous(), vc[:, :, T:].contiguous()
        for kind in kinds:
            layout = dalle_fast.Layout(kind, T, S, kernel_size=11 if kind == "conv" else 5)
            positions = [T, T + S * S // 2, N - 1]
            for p in positions:
                pos = torch.full((B,), p, dtype=torch.long, device=dev)
                idx = pos[:1]
                ours = lambda: dalle_fast.decode_attention(q, kn, vn, kc, vc, pos, layout)  # noqa: E731
                shared = lambda: dalle_fast.decode_attention(q, kn, vn, ik, iv, pos, layout, text_k_cache=tk,  # noqa: E731
                                                             text_v_cache=tv, prompt_index=prompt_index)

                def sdpa():
                    kc.index_copy_(2, idx, kn)
                    vc.index_copy_(2, idx, vn)
                    return F.scaled_dot_product_attention(q, kc[:, :, : p + 1], vc[:, :, : p + 1])

                t_ours = timeit(ours, dev)
                t_shared = timeit(shared, dev)
                t_sdpa = timeit(sdpa, dev)
                nbytes = must_read_bytes(layout, p, B, H, D, elem)
                nbytes_sh = must_read_bytes(layout, p, B, H, D, elem, prompts=P)
                rows.append(dict(
                    kind=kind, batch=B, pos=p, keys=int(layout.decode_keys(p).numel()), dtype=str(dtype)[6:],
                    ours_us=round(t_ours * 1e6, 1), sdpa_us=round(t_sdpa * 1e6, 1),
                    speedup=round(t_sdpa / t_ours, 2), ours_GBps=round(nbytes / t_ours / 1e9, 1),
                    shared_us=round(t_shared * 1e6, 1), shared_GBps=round(nbytes_sh / t_shared / 1e9, 1),
                ))
                if dev == "cuda":
                    rows[-1].update(kernel_times(dict(ours=(ours, t_ours, nbytes), shared=(shared, t_shared, nbytes_sh),
                                                      sdpa=(sdpa, t_sdpa, None)), peak))
                print("  ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    print()
    print(machine(dev))
    print(f"H={H} D={D} T={T} S={S}; shared = best-of-{args.candidates} rows sharing the text caches"
          + (f"; *_kernel_*: CUDA-graph replays, *_hbm_pct of {peak} TB/s" if dev == "cuda" else ""))
    print_table(rows, list(rows[0].keys()))
    for line in hbm_lines(rows):
        print(line)
    write_results(args.out, "decode", rows, {"machine": machine(dev), "device": dev, "quick": args.quick,
                                             "heads": H, "head_dim": D, "text_len": T, "image_size": S,
                                             "hbm_tbs": peak})


if __name__ == "__main__":
    main()
