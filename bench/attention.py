"""Benchmark dalle_fast.sparse_attention against the attention a user would pick instead.

Providers (each skipped with a note when it cannot run here):
    dalle_fast     dalle_fast.sparse_attention (cpu backend on CPU, triton on CUDA)
    sdpa_mask      torch SDPA with the dense boolean mask
    sdpa_causal    torch SDPA is_causal=True (FlashAttention-2 inside PyTorch on CUDA); computes
                   less than the DALL-E mask needs, the speed to beat on GPU
    flex128        torch.compile(flex_attention) with the same mask as a BlockMask, block 128
    flex<best>     the same with its best smaller block size (64 or 32)
    flash_attn     flash_attn_func(causal=True), when importable (CUDA)
    xformers       xformers memory_efficient_attention with a causal mask, when importable (CUDA)

Modes: fwd, bwd (backward alone), fwdbwd. Reports median ms, the ratio of each baseline's time to
dalle_fast's, GFLOP/s (TFLOP/s on CUDA) on the tiles each provider computes, and on CUDA the peak
memory the timed calls allocate on top of their inputs (``time_cases``). Writes CSV and JSON next to
the printed table.

    python bench/attention.py                       # CPU defaults: B=1, H=8, D=64, T=256, S=32
    python bench/attention.py --device cuda         # GPU defaults: B=8, H=16, bfloat16
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
try:  # the installed package, else a checkout with an in-place build
    import dalle_fast
except ImportError:
    sys.path.insert(0, str(ROOT))
    import dalle_fast  # noqa: E402
from dalle_fast import Layout  # noqa: E402
from dalle_fast.ops import computed_pairs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import check_at_least, check_cuda, comma_list, cpu_isas  # noqa: E402

MODES = ("fwd", "bwd", "fwdbwd")
#: modes run without --modes: on CUDA every mode issue 3's targets are stated for (backward alone
#: included); on CPU, where FlexAttention has no backward, forward and forward + backward
DEFAULT_MODES = {"cpu": "fwd,fwdbwd", "cuda": "fwd,bwd,fwdbwd"}
#: every provider the benchmark knows (``make_provider``); the CUDA-only ones are skipped with a note on CPU
PROVIDERS = ("dalle_fast", "sdpa_mask", "sdpa_causal", "flex128", "flex64", "flex32", "flash_attn", "xformers")


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads, ISA: {cpu_isas()}"


# ------------------------------------------------------------------------------------ timing
def time_ms(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        # events around each call, no synchronisation in between (as triton.testing.do_bench): the
        # GPU time of each call when the host keeps ahead, launch overhead where it cannot
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------ providers
class Skip(Exception):
    pass


_FLEX = []


def _compiled_flex(flex_attention):
    """One compiled flex_attention for the whole run (recompiles per block size and mode, not per
    call); a raised cache limit keeps dynamo from falling back to eager after 8 variants."""
    if not _FLEX:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def make_provider(name, layout: Layout, B, H, N, D, dtype, device):
    """Returns (attn(q, k, v) -> out, computed score entries per (batch, head))."""
    if name == "dalle_fast":
        backend = "cpu" if device == "cpu" else "triton"
        pairs = computed_pairs(layout, N, backend) if backend == "cpu" else None
        if device == "cuda":
            try:  # at the benchmark's shape: the first call autotunes the tile configuration
                x = torch.randn(B, H, N, D, device=device, dtype=dtype)
                dalle_fast.sparse_attention(x, x, x, layout, backend=backend)
            except ValueError as e:
                raise Skip(str(e))
            from dalle_fast.kernels.sparse_attention import last_forward_tiles
            pairs = layout.tile_table(N, *last_forward_tiles(dtype, D)).computed_pairs()
        return (lambda q, k, v: dalle_fast.sparse_attention(q, k, v, layout, backend=backend), pairs)
    if name == "sdpa_mask":
        mask = layout.dense_mask(N, device=device)
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), N * N)
    if name == "sdpa_causal":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), N * (N + 1) // 2)
    if name.startswith("flex"):
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Skip(f"flex_attention unavailable: {e}")
        block = int(name[4:])
        dense = layout.dense_mask(N, device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[q_idx, kv_idx]

        bm = create_block_mask(mask_mod, None, None, N, N, device=device, BLOCK_SIZE=block)
        flex = _compiled_flex(flex_attention)
        # on CUDA the kernel tiles must divide the BlockMask's block size
        opts = ({k: min(block, 128) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2",
                                               "BLOCK_N2")} if device == "cuda" and block < 128 else None)
        # computed tiles: the in-range part of every non-empty block of the BlockMask (as dalle_fast's
        # TileTable.computed_pairs counts its tiles: a last block past N is not counted whole)
        sizes = torch.clamp(N - torch.arange(-(-N // block)) * block, max=block)
        blocks = bm.to_dense()[0, 0].to("cpu", torch.int64)  # (query blocks, key blocks): 1 if computed
        return (lambda q, k, v: flex(q, k, v, block_mask=bm, kernel_options=opts),
                int((blocks * sizes[:, None] * sizes[None, :]).sum()))
    if name == "flash_attn":
        if device != "cuda":
            raise Skip("CUDA only")
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            raise Skip("flash_attn not importable")
        return (lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                causal=True).transpose(1, 2), N * (N + 1) // 2)
    if name == "xformers":
        if device != "cuda":
            raise Skip("CUDA only")
        try:
            import xformers.ops as xops
        except ImportError:
            raise Skip("xformers not importable")
        bias = xops.LowerTriangularMask()
        return (lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias).transpose(1, 2),
            N * (N + 1) // 2)
    raise ValueError(f"unknown provider {name!r}")


def prepare_case(provider, layout, mode, B, H, N, D, dtype, device):
    """Returns (fn running one call of ``mode``, FLOPs of one call on the computed tiles)."""
    attn, pairs = make_provider(provider, layout, B, H, N, D, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                attn(q, k, v)
        return fn, 4 * pairs * D * B * H
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    grad = torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype)
    if mode == "fwdbwd":
        def fn():
            torch.autograd.grad(attn(q, k, v), (q, k, v), grad)
        return fn, 14 * pairs * D * B * H  # 2 forward GEMMs + 5 backward GEMMs
    out = attn(q, k, v)  # backward alone, on a retained graph

    def fn():
        torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    return fn, 10 * pairs * D * B * H


def time_cases(cases, device, warmup, repeats, failed=None):
    """Median ms of each case. On CPU the cases run interleaved, one call each per round, so that
    a slow phase of a shared machine hits every provider alike; on CUDA one after the other, with
    each case's peak memory: the most its timed calls allocated on top of what was allocated before
    them (its inputs and, in ``bwd``, the retained forward; the other cases' tensors; what the
    warmup's compiling and tuning allocated, e.g. do_bench's cache-flush buffer, is not counted).
    A case that raises (a compile error, out of memory, a kernel refusing the GPU) is dropped and
    ``failed[name]`` says why, so that one baseline failing does not end the run."""
    failed = {} if failed is None else failed
    results = {}

    def fail(name, e):
        failed[name] = f"{type(e).__name__}: {str(e)[:200]}"

    if device == "cuda":
        for name, (fn, _) in cases.items():
            try:
                for _ in range(warmup):
                    fn()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                ms = time_ms(fn, device, 0, repeats)
                results[name] = (ms, (torch.cuda.max_memory_allocated() - base) / 2**20)
            except Exception as e:
                fail(name, e)
        return results
    live = dict(cases)
    for name, (fn, _) in cases.items():
        try:
            for _ in range(warmup):
                fn()
        except Exception as e:
            fail(name, e)
            del live[name]
    samples = {name: [] for name in live}
    for _ in range(repeats):
        for name, (fn, _) in list(live.items()):
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:
                fail(name, e)
                del live[name], samples[name]
                continue
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(v), None) for name, v in samples.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 8 on CUDA")
    p.add_argument("--heads", type=int, default=None, help="default 8 on CPU, 16 on CUDA")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--kinds", default="row,col,conv,full")
    p.add_argument("--modes", default=None, help="comma list of fwd, bwd, fwdbwd (default: "
                   + "; ".join(f"{v} on {k.upper()}" for k, v in DEFAULT_MODES.items()) + ")")
    p.add_argument("--providers", default=None, help="comma list; default: all for the device")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"), help="directory for CSV/JSON")
    p.add_argument("--quick-flex", action="store_true",
                   help="on CUDA, compare FlexAttention at block sizes 128 and 64 only (saves compile time)")
    args = p.parse_args(argv)

    device = args.device
    check_cuda(p, device)
    check_at_least(p, args, 1, "--batch", "--heads", "--head-dim", "--text-len", "--image-size", "--repeats",
                   "--threads")
    check_at_least(p, args, 0, "--warmup")
    kinds = comma_list(p, "--kinds", args.kinds, dalle_fast.KINDS)
    modes = comma_list(p, "--modes", args.modes if args.modes is not None else DEFAULT_MODES[device], MODES)
    if args.providers is not None:
        providers = comma_list(p, "--providers", args.providers, PROVIDERS)
    else:
        providers = (["dalle_fast", "sdpa_mask", "sdpa_causal", "flex128", "flex64", "flex32"]
                     + ([] if device == "cpu" else ["flash_attn", "xformers"]))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cpu = device == "cpu"
    dtype = getattr(torch, args.dtype or ("float32" if cpu else "bfloat16"))
    B = args.batch if args.batch is not None else (1 if cpu else 8)
    H = args.heads if args.heads is not None else (8 if cpu else 16)
    D = args.head_dim
    if args.repeats is None:
        args.repeats = 10 if cpu else 50
    if args.warmup is None:
        args.warmup = 3 if cpu else 10
    if "dalle_fast" in providers:  # the backend the benchmark measures must serve this head_dim
        from dalle_fast.ops import CPU_MAX_HEAD_DIM
        ok = args.head_dim <= CPU_MAX_HEAD_DIM if cpu else args.head_dim in (32, 64, 128)
        if not ok:
            p.error(f"--head-dim {args.head_dim}: dalle_fast's {'cpu' if cpu else 'triton'} backend supports "
                    + (f"head_dim <= {CPU_MAX_HEAD_DIM}" if cpu else "32, 64 and 128")
                    + " (leave dalle_fast out of --providers to time the others)")
    if args.providers is None and not cpu and args.quick_flex:
        providers.remove("flex32")  # its compile time; 64 is the best smaller size on Hopper
    unit = "GFLOP/s" if cpu else "TFLOP/s"
    div = 1.0 if cpu else 1e3

    machine = machine_name(device)
    print(f"# dalle_fast {dalle_fast.__version__} attention benchmark on {machine}")
    print(f"# torch {torch.__version__}, {dtype}, B={B} H={H} D={D} T={args.text_len} "
          f"S={args.image_size} (N={args.text_len + args.image_size ** 2})")

    rows, notes = [], []
    missing = set()  # (kind, mode, provider) asked for but not measured: skipped or failed
    for kind in kinds:
        layout = Layout(kind, args.text_len, args.image_size)
        N = layout.seq_len
        for mode in modes:
            cases = {}
            for prov in providers:
                if cpu and prov.startswith("flex") and mode != "fwd":
                    note = f"{prov} {mode}: skipped (FlexAttention has no CPU backward)"
                    if note not in notes:
                        notes.append(note)
                    missing.add((kind, mode, prov))
                    continue
                try:
                    cases[prov] = prepare_case(prov, layout, mode, B, H, N, D, dtype, device)
                except Skip as e:
                    notes.append(f"{prov} {kind} {mode}: skipped ({e})")
                    missing.add((kind, mode, prov))
                except Exception as e:  # a baseline failing must not hide the others
                    notes.append(f"{prov} {kind} {mode}: failed ({type(e).__name__}: {str(e)[:200]})")
                    missing.add((kind, mode, prov))
            failed = {}
            timed = time_cases(cases, device, args.warmup, args.repeats, failed)
            for prov, why in failed.items():  # raised when called: compile error, out of memory, ...
                notes.append(f"{prov} {kind} {mode}: failed ({why})")
                missing.add((kind, mode, prov))
            for prov, (ms, peak) in timed.items():
                rate = cases[prov][1] / ms / 1e6  # GFLOP/s
                rows.append(dict(kind=kind, mode=mode, provider=prov, ms=ms, rate=rate / div, peak_mib=peak))
                print(f"# {kind} {mode} {prov}: {ms:.3f} ms", flush=True)
        # results so far on disk and in the log after every kind: a run cut short (the GPU check's
        # time limit) keeps what it measured
        write_outputs(args, summarize(rows), notes, machine, dtype, B, H, D, device, unit)

    rows = summarize(rows)
    ours = {(r["kind"], r["mode"]): r["ms"] for r in rows if r["provider"] == "dalle_fast"}

    header = f"{'kind':<10}{'mode':<8}{'provider':<13}{'ms':>10}{unit:>10}{'dalle_fast x':>14}"
    if not cpu:
        header += f"{'peak MiB':>10}"
    print(header)
    for r in rows:
        sp = f"{r['speedup_of_dalle_fast']:.2f}x" if r["speedup_of_dalle_fast"] else "-"
        line = f"{r['kind']:<10}{r['mode']:<8}{r['provider']:<13}{r['ms']:>10.3f}{r['rate']:>10.1f}{sp:>14}"
        if not cpu:
            line += f"{r['peak_mib']:>10.0f}"
        print(line)
    for mode in modes:
        if ("row", mode) in ours and ("col", mode) in ours:
            print(f"# col / row time ({mode}): {ours[('col', mode)] / ours[('row', mode)]:.2f}")
    for n in notes:
        print(f"# {n}")
    goals = targets(rows, missing) if not cpu else []
    if goals:
        print(f"# issue 3's speed targets (stated for an H100; this run: {machine}):")
        for g in goals:
            print(f"#   {target_line(g)}")

    stem = write_outputs(args, rows, notes, machine, dtype, B, H, D, device, unit, goals)
    print(f"# wrote {stem}.csv and {stem}.json")
    if not cpu:
        write_tuning_log(f"{stem}_tuning.csv", B * H, args.text_len, args.image_size)
    return rows


def summarize(rows):
    """Keeps flex128 and the faster of flex64/flex32 per (kind, mode) and adds each baseline's time
    over dalle_fast's (``speedup_of_dalle_fast``). Returns new row dicts."""
    best = {}
    for r in rows:
        if r["provider"] in ("flex64", "flex32"):
            key = (r["kind"], r["mode"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    rows = [dict(r) for r in rows if r["provider"] not in ("flex64", "flex32") or best[(r["kind"], r["mode"])] is r]
    ours = {(r["kind"], r["mode"]): r["ms"] for r in rows if r["provider"] == "dalle_fast"}
    for r in rows:
        base = ours.get((r["kind"], r["mode"]))
        r["speedup_of_dalle_fast"] = (r["ms"] / base) if base and r["provider"] != "dalle_fast" else None
    return rows


#: issue 3's speed targets: (label, mode, baselines (the fastest present is the one to beat), goal)
_SPEEDUPS = (
    ("forward vs compiled FlexAttention (x faster)", "fwd", ("flex128", "flex64", "flex32"), 1.5),
    ("forward vs SDPA is_causal=True (x faster)", "fwd", ("sdpa_causal",), 2.0),
    ("backward vs compiled FlexAttention (x faster)", "bwd", ("flex128", "flex64", "flex32"), 1.3),
)


def targets(rows, missing=()):
    """Issue 3's speed targets checked on ``rows`` (as ``summarize`` returns them): per kind the
    speedups over the fastest FlexAttention and SDPA causal, forward TFLOP/s on the computed tiles,
    and col's time over row's per mode. Returns dicts of target, kind, value, goal, met, missing.
    ``missing`` holds the (kind, mode, provider) that were asked for but not measured (skipped,
    failed): a target that needs one of them has ``met`` None ("unchecked", with the value of what
    was measured, or None), never True, since the one left out may be the one to beat (the fastest
    Flex block size) or dalle_fast itself. A target whose providers were not asked for (not in
    ``--providers``, mode not run) is left out."""
    missing = set(missing)
    by = {(r["kind"], r["mode"], r["provider"]): r for r in rows}
    kinds = list(dict.fromkeys([r["kind"] for r in rows] + [m[0] for m in missing]))
    out = []
    for kind in kinds:
        for label, mode, bases, goal in _SPEEDUPS:
            ours = by.get((kind, mode, "dalle_fast"))
            times = [by[(kind, mode, b)]["ms"] for b in bases if (kind, mode, b) in by]
            lost = [p for p in ("dalle_fast",) + bases if (kind, mode, p) in missing]
            v = min(times) / ours["ms"] if ours and times else None
            if v is None and not lost:
                continue
            out.append(dict(target=label, kind=kind, value=v, goal=f">= {goal}",
                            met=None if lost else v >= goal, missing=lost))
        ours = by.get((kind, "fwd", "dalle_fast"))
        lost = ["dalle_fast"] if (kind, "fwd", "dalle_fast") in missing else []
        if ours or lost:
            out.append(dict(target="forward TFLOP/s on the computed tiles", kind=kind,
                            value=ours["rate"] if ours else None, goal=">= 300",
                            met=None if lost else ours["rate"] >= 300, missing=lost))
    for mode in ("fwd", "bwd", "fwdbwd"):
        row, col = by.get(("row", mode, "dalle_fast")), by.get(("col", mode, "dalle_fast"))
        lost = [f"{k} dalle_fast" for k in ("row", "col") if (k, mode, "dalle_fast") in missing]
        if (row and col) or (lost and all(k in kinds for k in ("row", "col"))):
            v = col["ms"] / row["ms"] if row and col else None
            out.append(dict(target=f"col time / row time ({mode})", kind="col", value=v, goal="<= 1.15",
                            met=None if lost else v <= 1.15, missing=lost))
    return out


def target_line(g) -> str:
    """One printed line of a ``targets`` entry: value, goal and met / NOT met / unchecked."""
    value = f"{g['value']:>8.2f}" if g["value"] is not None else f"{'-':>8}"
    verdict = (("met" if g["met"] else "NOT met") if g["met"] is not None
               else f"unchecked ({', '.join(g['missing'])} not measured)")
    return f"{g['target']:<44} {g['kind']:<6} {value} {g['goal']:<8} {verdict}"


def write_outputs(args, rows, notes, machine, dtype, B, H, D, device, unit, goals=None):
    """CSV and JSON of ``rows`` (with the speed ``goals`` checked, if given) and on CUDA the tuner's
    table, under ``--out``; returns the stem."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"attention_{device}"
    meta = dict(machine=machine, torch=torch.__version__, dalle_fast=dalle_fast.__version__, dtype=str(dtype),
                batch=B, heads=H, head_dim=D, text_len=args.text_len, image_size=args.image_size,
                rate_unit=unit, notes=notes)
    with open(f"{stem}.json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, targets=goals or []), f, indent=1)
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["kind"])
        w.writeheader()
        w.writerows(rows)
    if device == "cuda":
        write_tuning_log(f"{stem}_tuning.csv", B * H, args.text_len, args.image_size, quiet=True)
    return stem


# GEMMs per score entry of each Triton kernel (x 2 D FLOPs each): forward QK^T, PV; dK/dV QK^T,
# dO V^T, P^T dO, dS^T Q; dQ QK^T, dO V^T, dS K
_KERNEL_GEMMS = {"fwd": 2, "dkdv": 4, "dq": 3}


def l2_traffic(kernel: str, table, head_dim: int, elem_bytes: int, bh: int, flat: int = 0) -> int:
    """Bytes one launch of a Triton kernel moves between L2 and the SMs, from its tile table (a
    model: every tile counted once per program that loads it, nothing served from L1; reads and
    writes, in-range rows only; table and index loads left out): the sum of :func:`l2_reads_writes`.

    fwd: q once per query tile (per pair in the flat forward, which reloads it), K and V per pair,
    out and lse written once. dq: q, dO, O and lse per query tile, K and V per pair, dq and delta
    written. dkdv: K and V per key tile, q, dO, lse and delta per pair, dK and dV written. Set next
    to a kernel's time (``l2_tbs`` in the tuning table) it says whether the kernel runs near what
    L2 delivers (an H100's ~5.5-7 TB/s in published microbenchmarks)."""
    return sum(l2_reads_writes(kernel, table, head_dim, elem_bytes, bh, flat))


def l2_reads_writes(kernel: str, table, head_dim: int, elem_bytes: int, bh: int, flat: int = 0) -> tuple:
    """``(read, written)`` bytes of one launch of ``kernel`` as :func:`l2_traffic` models it."""
    n, bm, bn = table.seq_len, table.block_m, table.block_n
    rows = torch.clamp(n - torch.arange(table.num_q_tiles) * bm, max=bm)  # in-range rows per query tile
    cols = torch.clamp(n - torch.arange(table.num_k_tiles) * bn, max=bn)  # and per key tile
    counts = (table.row_ptr[1:] - table.row_ptr[:-1]).long()
    pair_rows = int(rows.repeat_interleave(counts).sum())  # query rows over all (query, key) tile pairs
    pair_cols = int(cols[table.col_idx.long()].sum())  # key rows over all pairs
    q_rows, k_rows, row, f32 = int(rows.sum()), int(cols.sum()), head_dim * elem_bytes, 4
    if kernel == "fwd":
        read, written = (pair_rows if flat else q_rows) * row + 2 * pair_cols * row, q_rows * (row + f32)
    elif kernel == "dq":
        read, written = q_rows * (3 * row + f32) + 2 * pair_cols * row, q_rows * (row + f32)
    elif kernel == "dkdv":
        read, written = 2 * k_rows * row + pair_rows * (2 * row + 2 * f32), 2 * k_rows * row
    else:
        raise ValueError(f"kernel must be one of fwd, dq, dkdv, got {kernel!r}")
    return bh * read, bh * written


def write_tuning_log(path, bh, text_len, image_size, quiet=False):
    """The Triton tuner's timing of every candidate configuration (kernel time, do_bench) with
    TFLOP/s on that configuration's computed tiles and the L2 traffic of its tile table
    (:func:`l2_traffic`); prints the best and worst per kernel and kind (unless ``quiet``: the
    partial writes during a run)."""
    if "dalle_fast.kernels.sparse_attention" not in sys.modules:
        return
    from dalle_fast import KINDS
    from dalle_fast.kernels.sparse_attention import TUNING_LOG

    rows = []
    for e in TUNING_LOG:
        _, n, _, _, _, kind, _, _, d, dtype, _ = e["key"]  # kernels.sparse_attention._tuning_key
        cfg = e["config"]
        table = Layout(KINDS[kind], text_len, image_size).tile_table(n, cfg.block_m, cfg.block_n)
        flops = 2 * _KERNEL_GEMMS[e["kernel"]] * table.computed_pairs() * d * bh
        moved = l2_traffic(e["kernel"], table, d, torch.finfo(dtype).bits // 8, bh, cfg.flat)
        rows.append(dict(kernel=e["kernel"], kind=KINDS[kind], seq=n, head_dim=d, dtype=str(dtype).replace("torch.", ""),
                         block_m=cfg.block_m, block_n=cfg.block_n, warps=cfg.num_warps, stages=cfg.num_stages,
                         flat=cfg.flat, order=cfg.order, maxnreg=cfg.maxnreg,
                         us=None if e["ms"] is None else round(e["ms"] * 1e3, 2),
                         tflops=None if e["ms"] is None else round(flops / e["ms"] / 1e9, 1),
                         l2_mb=round(moved / 1e6, 1),
                         l2_tbs=None if e["ms"] is None else round(moved / e["ms"] / 1e9, 2),
                         n_regs=e["n_regs"], n_spills=e["n_spills"], note=e["note"]))
    if not rows:
        if not quiet:
            print("# Triton tuner: no timings in this run (configurations from the tuning cache, "
                  "DALLE_FAST_TUNING_CACHE=0 re-tunes; or tuning off)")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    if quiet:
        return
    print(f"# Triton tuner, kernel time per candidate (do_bench), {len(rows)} timings -> {path}")
    groups = {}
    for r in rows:
        if r["us"] is not None:
            groups.setdefault((r["kernel"], r["kind"], r["head_dim"], r["dtype"]), []).append(r)
    for (kernel, kind, d, dt), rs in groups.items():
        rs.sort(key=lambda r: r["us"])
        b, w_ = rs[0], rs[-1]
        flat = [r for r in rs if r["flat"]]
        flat_best = f"; best flat {_label(flat[0])} {flat[0]['us']:.1f} us" if flat else ""
        capped = [r for r in rs if r["maxnreg"]]
        capped_best = f"; best capped {_label(capped[0])} {capped[0]['us']:.1f} us" if capped else ""
        by_order = {o: min((r["us"] for r in rs if r["order"] == o and not r["flat"]), default=None) for o in (0, 1)}
        orders = (f"; best o0 {by_order[0]:.1f} us, o1 {by_order[1]:.1f} us"
                  if None not in by_order.values() else "")
        print(f"#   {kernel:<5}{kind:<10}D={d} {dt}: best {_label(b)} "
              f"{b['us']:.1f} us {b['tflops']:.0f} TFLOP/s, L2 {b['l2_tbs']:.1f} TB/s (model); worst {_label(w_)} "
              f"{w_['us']:.1f} us{flat_best}{capped_best}{orders}; spilling skipped: "
              f"{sum(1 for r in rows if r['note'].startswith('spills') and r['kernel'] == kernel and r['kind'] == kind)}")


def _label(r) -> str:
    """A tuning row's configuration, e.g. ``128x64 w8 s3 r128 o1``: tile, warps, stages, flat forward
    (``f<pairs>``), register cap (``r<maxnreg>``), program order (``o0`` batch*head-major, ``o1``
    tile-major, heaviest tiles first)."""
    return (f"{r['block_m']}x{r['block_n']} w{r['warps']} s{r['stages']}" + (f" f{r['flat']}" if r["flat"] else "")
            + (f" r{r['maxnreg']}" if r["maxnreg"] else "") + f" o{r['order']}")


if __name__ == "__main__":
    main()
