"""Benchmark dalle_fast.sparse_attention against the attention a user would pick instead.

Providers (each skipped with a note when it cannot run here):
    dalle_fast     dalle_fast.sparse_attention (cpu backend on CPU, triton on CUDA); on CUDA one row
                   per Triton path, dalle_fast[portable] / dalle_fast[hopper] (--triton-path)
    sdpa_mask      torch SDPA with the dense boolean mask
    sdpa_causal    torch SDPA is_causal=True (FlashAttention-2 inside PyTorch on CUDA); computes
                   less than the DALL-E mask needs, the speed to beat on GPU
    flex128        torch.compile(flex_attention) with the same mask as a BlockMask, block 128
    flex<best>     the same with its best smaller block size (64 or 32)
    flash_attn     flash_attn_func(causal=True), when importable (CUDA)
    xformers       xformers memory_efficient_attention with a causal mask, when importable (CUDA)

Modes: fwd, bwd (backward alone), fwdbwd. Reports median ms through the op (what a user's eager
loop sees: host work and launches included), the ratio of each baseline's time to dalle_fast's,
GFLOP/s (TFLOP/s on CUDA) on the tiles each provider computes, and on CUDA the peak memory the timed
calls allocate on top of their inputs (``time_cases``). On CUDA also the kernel-only time of every
provider (``time_kernels``), with its own ratio and TFLOP/s: the calls captured in a CUDA graph
whose replays are timed (method "cuda graph"), or where a provider cannot be captured the GPU time
torch.profiler records per call (method "profiler"); ``--kernel-split`` adds dalle_fast's time per
kernel (profiler, grouped by kernel name). The kind ``full`` is the plain causal mask: dalle_fast
and SDPA ``is_causal=True`` then do equal work. On CPU kernel-only times do not apply ("-"). Writes
CSV and JSON next to the printed table.

    python bench/attention.py                       # CPU defaults: B=1, H=8, D=64, T=256, S=32
    python bench/attention.py --device cuda         # GPU defaults: B=8, H=16, bfloat16
    python bench/attention.py --device cuda --triton-path portable,hopper --kernel-split
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
# _util first: it makes the installed dalle_fast importable, else this checkout's
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import GRAPH_REPLAY_MS, check_at_least, check_cuda, comma_list, cpu_isas, graph_time_ms  # noqa: E402,F401
import dalle_fast  # noqa: E402
from dalle_fast import Layout  # noqa: E402
from dalle_fast.ops import computed_pairs  # noqa: E402


MODES = ("fwd", "bwd", "fwdbwd")
#: modes run without --modes: on CUDA every mode the GPU speed targets are stated for (backward alone
#: included); on CPU, where FlexAttention has no backward, forward and forward + backward
DEFAULT_MODES = {"cpu": "fwd,fwdbwd", "cuda": "fwd,bwd,fwdbwd"}
#: every provider the benchmark knows (``make_provider``); the CUDA-only ones are skipped with a note on CPU
PROVIDERS = ("dalle_fast", "sdpa_mask", "sdpa_causal", "flex128", "flex64", "flex32", "flash_attn", "xformers")
#: dalle_fast's Triton paths (``dalle_fast.triton_path``): today's kernels, which run on any GPU
#: Triton serves, and the sm_90 kernels (TMA, warp specialisation)
TRITON_PATHS = ("portable", "hopper")
#: (BLOCK_M, BLOCK_N) of the tile table the hopper path's TFLOP/s are counted on: its 128-row query
#: tiles, 64 keys per step
HOPPER_TILES = (128, 64)
FLEX = ("flex128", "flex64", "flex32")


def is_ours(provider: str) -> bool:
    """Whether a provider name is a dalle_fast row (``dalle_fast`` or ``dalle_fast[<path>]``)."""
    return provider == "dalle_fast" or (provider.startswith("dalle_fast[") and provider.endswith("]"))


def path_of(provider: str) -> Optional[str]:
    """The Triton path of a ``dalle_fast[<path>]`` row, None for plain ``dalle_fast``."""
    return provider[len("dalle_fast["):-1] if is_ours(provider) and provider != "dalle_fast" else None


def triton_path_api():
    """``(use_triton_path, triton_path)`` of this dalle_fast, or None where it has one Triton path."""
    use, pick = getattr(dalle_fast, "use_triton_path", None), getattr(dalle_fast, "triton_path", None)
    return (use, pick) if callable(use) and callable(pick) else None


def dalle_fast_rows(device: str, spec: Optional[str]) -> list:
    """Provider names of the dalle_fast rows: ``dalle_fast`` on CPU; on CUDA one ``dalle_fast[<path>]``
    per path of ``spec`` (a comma list of TRITON_PATHS), by default the path ``dalle_fast.triton_path()``
    picks on this GPU (plain ``dalle_fast`` where this dalle_fast has one path)."""
    if device != "cuda":
        return ["dalle_fast"]
    if spec is not None:
        return [f"dalle_fast[{p}]" for p in dict.fromkeys(spec.split(","))]
    api = triton_path_api()
    try:
        return ["dalle_fast"] if api is None else [f"dalle_fast[{api[1]()}]"]
    except Exception:  # noqa: BLE001 - the row then runs whatever path the call picks (noted in main)
        return ["dalle_fast"]


def path_context(provider: str) -> Callable:
    """A factory of the context manager that runs a call of ``provider`` on its Triton path (a null
    context for the others). Raises Skip for a path this dalle_fast does not have."""
    import contextlib

    path = path_of(provider)
    if path is None:
        return contextlib.nullcontext
    if path not in TRITON_PATHS:
        raise ValueError(f"unknown Triton path {path!r}; choose from {', '.join(TRITON_PATHS)}")
    api = triton_path_api()
    if api is None:
        if path == "portable":  # a dalle_fast with one path runs today's (portable) kernels
            return contextlib.nullcontext
        raise Skip(f"this dalle_fast has no {path!r} Triton path (no dalle_fast.use_triton_path)")
    use = api[0]
    return lambda: use(path)


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
    """Returns (attn(q, k, v) -> out, computed score entries per (batch, head)). A dalle_fast row's
    attn runs on its Triton path (``path_context``)."""
    if is_ours(name):
        backend = "cpu" if device == "cpu" else "triton"
        pairs = computed_pairs(layout, N, backend) if backend == "cpu" else None
        if device == "cuda":
            context = path_context(name)
            try:  # at the benchmark's shape: the first call autotunes the tile configuration
                x = torch.randn(B, H, N, D, device=device, dtype=dtype)
                with context():
                    dalle_fast.sparse_attention(x, x, x, layout, backend=backend)
            except ValueError as e:
                raise Skip(str(e))
            if path_of(name) == "hopper":
                pairs = layout.tile_table(N, *HOPPER_TILES).computed_pairs()
            else:
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


class Case(NamedTuple):
    """One timed call: ``fn`` runs it, ``flops`` it computes on the computed tiles; ``setup`` (bwd)
    redoes the retained forward ``fn`` differentiates, on the current stream (autograd runs a
    backward on its forward's stream, so a CUDA graph capturing ``fn`` needs the forward on the
    capture stream)."""

    fn: Callable
    flops: int
    setup: Optional[Callable] = None


def prepare_case(provider, layout, mode, B, H, N, D, dtype, device) -> Case:
    """The :class:`Case` of one call of ``mode``; a dalle_fast row's calls (the retained forward
    included) run on its Triton path (the context manager's enter and exit are part of the time
    through the op)."""
    attn, pairs = make_provider(provider, layout, B, H, N, D, dtype, device)
    context = path_context(provider) if path_of(provider) else None
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))

    def on_path(f):
        if context is None:
            return f

        def g():
            with context():
                f()
        return g

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                attn(q, k, v)
        return Case(on_path(fn), 4 * pairs * D * B * H)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    grad = torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype)
    if mode == "fwdbwd":
        def fn():
            torch.autograd.grad(attn(q, k, v), (q, k, v), grad)
        return Case(on_path(fn), 14 * pairs * D * B * H)  # 2 forward GEMMs + 5 backward GEMMs
    retained = []  # backward alone, on a retained graph

    def setup():
        retained[:] = [attn(q, k, v)]

    def fn():
        torch.autograd.grad(retained[0], (q, k, v), grad, retain_graph=True)
    on_path(setup)()
    return Case(on_path(fn), 10 * pairs * D * B * H, on_path(setup))


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
        for name, case in cases.items():
            fn = case[0]
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
    live = {name: case[0] for name, case in cases.items()}
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as e:
            fail(name, e)
            del live[name]
    samples = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in list(live.items()):
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:
                fail(name, e)
                del live[name], samples[name]
                continue
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(v), None) for name, v in samples.items()}


# ------------------------------------------------------------------------------------ kernel-only time
#: calls recorded by the profiler for a kernel time or a per-kernel split
PROFILE_CALLS = 10


def gpu_event_times(events, calls: int) -> dict:
    """``{name: us per call}`` of the device activity among profiler ``events`` (FunctionEvents of
    device type CUDA: kernels, memsets, copies), summed per name over ``calls`` calls, slowest first."""
    from torch.autograd import DeviceType

    totals: dict = {}
    for e in events:
        if e.device_type == DeviceType.CUDA:
            totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us()
    return dict(sorted(((name, us / calls) for name, us in totals.items()), key=lambda kv: -kv[1]))


def profiler_times(fn, calls: int = PROFILE_CALLS) -> dict:
    """GPU time per call of each kernel (``gpu_event_times``) of ``calls`` calls of ``fn`` under
    torch.profiler; raises when it recorded no GPU activity (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = gpu_event_times(prof.events(), calls)
    if not times:
        raise RuntimeError("torch.profiler recorded no GPU activity")
    return times


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"


def time_kernels(cases, op_ms, repeats: int, split=()):
    """Kernel-only time of each CUDA case, ``({name: dict(kernel_ms, kernel_method, kernel_split)},
    {name: note})``. ``kernel_method`` "cuda graph" (:func:`graph_time_ms`), or "profiler" (the GPU
    time :func:`profiler_times` records per call) where the case cannot be captured, the reason in
    its note; None, with a note, when both fail. ``kernel_split`` (names in ``split``): us per call
    of each kernel, from the profiler. ``op_ms``: the through-the-op ms per name (sizes the graph)."""
    results, notes = {}, {}
    for name, case in cases.items():
        r = dict(kernel_ms=None, kernel_method=None, kernel_split=None)
        times = None
        try:
            r["kernel_ms"] = graph_time_ms(case.fn, repeats, op_ms.get(name), setup=case.setup)
            r["kernel_method"] = "cuda graph"
        except Exception as e:  # noqa: BLE001 - any failure to capture falls back to the profiler
            why = _why(e)
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
            try:
                times = profiler_times(case[0])
                r["kernel_ms"] = sum(times.values()) / 1e3
                r["kernel_method"] = "profiler"
                notes[name] = f"kernel time by profiler (CUDA-graph capture failed: {why})"
            except Exception as e2:  # noqa: BLE001
                notes[name] = f"no kernel time (CUDA-graph capture failed: {why}; profiler: {_why(e2)})"
        if name in split:
            try:
                times = times if times is not None else profiler_times(case[0])
                r["kernel_split"] = {k: round(us, 2) for k, us in times.items()}
            except Exception as e:  # noqa: BLE001
                notes[name] = (notes[name] + "; " if name in notes else "") + f"no kernel split ({_why(e)})"
        results[name] = r
    return results, notes


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
    p.add_argument("--triton-path", default=None,
                   help="CUDA: comma list of dalle_fast's Triton paths to time, one row each "
                        f"({', '.join(TRITON_PATHS)}; default: the path dalle_fast.triton_path() picks)")
    p.add_argument("--kernel-split", action="store_true",
                   help="CUDA: also each dalle_fast kernel's time per call (torch.profiler, by kernel name)")
    args = p.parse_args(argv)

    device = args.device
    check_cuda(p, device)
    check_at_least(p, args, 1, "--batch", "--heads", "--head-dim", "--text-len", "--image-size", "--repeats",
                   "--threads")
    check_at_least(p, args, 0, "--warmup")
    if args.triton_path is not None:
        comma_list(p, "--triton-path", args.triton_path, TRITON_PATHS)
    if device != "cuda":
        for flag, given in (("--triton-path", args.triton_path is not None), ("--kernel-split", args.kernel_split)):
            if given:
                p.error(f"{flag} applies to --device cuda (the cpu backend has one path and no kernel-only time)")
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
        from dalle_fast.ops import CPU_MAX_HEAD_DIM, TRITON_HEAD_DIMS
        ok = args.head_dim <= CPU_MAX_HEAD_DIM if cpu else args.head_dim in TRITON_HEAD_DIMS
        if not ok:
            p.error(f"--head-dim {args.head_dim}: dalle_fast's {'cpu' if cpu else 'triton'} backend supports "
                    + (f"head_dim <= {CPU_MAX_HEAD_DIM}" if cpu else ", ".join(map(str, TRITON_HEAD_DIMS)))
                    + " (leave dalle_fast out of --providers to time the others)")
    if args.providers is None and not cpu and args.quick_flex:
        providers.remove("flex32")  # its compile time; 64 is the best smaller size on Hopper
    if "dalle_fast" in providers:  # one row per Triton path on CUDA
        at = providers.index("dalle_fast")
        providers[at:at + 1] = dalle_fast_rows(device, args.triton_path)
    unit = "GFLOP/s" if cpu else "TFLOP/s"
    div = 1.0 if cpu else 1e3

    machine = machine_name(device)
    print(f"# dalle_fast {dalle_fast.__version__} attention benchmark on {machine}")
    print(f"# torch {torch.__version__}, {dtype}, B={B} H={H} D={D} T={args.text_len} "
          f"S={args.image_size} (N={args.text_len + args.image_size ** 2})")

    rows, notes = [], []
    missing = set()  # (kind, mode, provider) asked for but not measured: skipped or failed
    if not cpu:
        api = triton_path_api()
        try:
            picked = api[1]() if api else "portable (this dalle_fast has one path)"
        except Exception as e:  # noqa: BLE001
            picked = f"unknown (dalle_fast.triton_path() raised {_why(e)})"
        notes.append(f"dalle_fast Triton path picked on this GPU: {picked}")
        if any(path_of(prov) == "hopper" for prov in providers):
            notes.append(f"dalle_fast[hopper] TFLOP/s counted on the {HOPPER_TILES[0]} x {HOPPER_TILES[1]} tile table")
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
            kernel = {}
            if not cpu:  # kernel-only, after every case's through-the-op time
                split = [prov for prov in timed if is_ours(prov)] if args.kernel_split else []
                kernel, why = time_kernels({prov: cases[prov] for prov in timed},
                                           {prov: t[0] for prov, t in timed.items()}, args.repeats, split)
                notes.extend(f"{prov} {kind} {mode}: {w}" for prov, w in why.items())
            for prov, (ms, peak) in timed.items():
                flops = cases[prov][1]
                k = kernel.get(prov, dict(kernel_ms=None, kernel_method=None, kernel_split=None))
                k_rate = flops / k["kernel_ms"] / 1e6 / div if k["kernel_ms"] else None
                rows.append(dict(kind=kind, mode=mode, provider=prov, ms=ms, rate=flops / ms / 1e6 / div,
                                 peak_mib=peak, kernel_ms=k["kernel_ms"], kernel_rate=k_rate,
                                 kernel_method=k["kernel_method"], kernel_split=k["kernel_split"]))
                shown = f", kernel {k['kernel_ms']:.3f} ms ({k['kernel_method']})" if k["kernel_ms"] else ""
                print(f"# {kind} {mode} {prov}: {ms:.3f} ms{shown}", flush=True)
        # results so far on disk and in the log after every kind: a run cut short (the GPU check's
        # time limit) keeps what it measured
        write_outputs(args, summarize(rows), notes, machine, dtype, B, H, D, device, unit, missing=missing)

    rows = summarize(rows)
    print_table(rows, unit, cpu)
    ours_names = list(dict.fromkeys(r["provider"] for r in rows if is_ours(r["provider"])))
    for prov in ours_names:
        ours = {(r["kind"], r["mode"]): r for r in rows if r["provider"] == prov}
        for mode in modes:
            if ("row", mode) in ours and ("col", mode) in ours:
                col, row = ours[("col", mode)], ours[("row", mode)]
                kernel = (f", kernel-only {col['kernel_ms'] / row['kernel_ms']:.2f}"
                          if col["kernel_ms"] and row["kernel_ms"] else "")
                print(f"# {prov} col / row time ({mode}): {col['ms'] / row['ms']:.2f}{kernel}")
    for line in equal_work_lines(rows):
        print(f"# {line}")
    for r in rows:
        if r["kernel_split"]:
            parts = ", ".join(f"{name} {us:.1f}" for name, us in r["kernel_split"].items())
            print(f"# kernel split (us per call, profiler) {r['provider']} {r['kind']} {r['mode']}: {parts}")
    for n in notes:
        print(f"# {n}")
    goals = targets(rows, missing) if not cpu else []
    if goals:
        print(f"# speed targets (stated for one H100 or H200; this run: {machine}):")
        for g in goals:
            print(f"#   {target_line(g)}")

    stem = write_outputs(args, rows, notes, machine, dtype, B, H, D, device, unit, goals, missing)
    print(f"# wrote {stem}.csv and {stem}.json")
    if not cpu:
        write_tuning_log(f"{stem}_tuning.csv", B * H, args.text_len, args.image_size)
    return rows


def print_table(rows, unit: str, cpu: bool) -> None:
    """The result table: through-the-op and kernel-only ms, rate and ratio to dalle_fast; "-" where
    kernel-only does not apply (CPU) or was not measured."""
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    def ratio(v):
        return f"{v:.2f}x" if v else "-"

    header = (f"{'kind':<10}{'mode':<8}{'provider':<22}{'ms':>10}{'kernel ms':>11}{unit:>10}{'kernel ' + unit:>16}"
              f"{'dalle_fast x':>14}{'kernel x':>10}  {'method':<11}")
    if not cpu:
        header += f"{'peak MiB':>9}"
    print(header)
    for r in rows:
        line = (f"{r['kind']:<10}{r['mode']:<8}{r['provider']:<22}{r['ms']:>10.3f}{num(r.get('kernel_ms'), '.3f'):>11}"
                f"{r['rate']:>10.1f}{num(r.get('kernel_rate'), '.1f'):>16}{ratio(r.get('speedup_of_dalle_fast')):>14}"
                f"{ratio(r.get('kernel_speedup_of_dalle_fast')):>10}  {r.get('kernel_method') or '-':<11}")
        if not cpu:
            line += f"{num(r.get('peak_mib'), '.0f'):>9}"
        print(line)


def equal_work_lines(rows) -> list:
    """On the plain causal mask (kind ``full``) dalle_fast computes what SDPA ``is_causal=True``
    does: per mode and dalle_fast row, SDPA's time over dalle_fast's, kernel-only and through the op."""
    by = {(r["kind"], r["mode"], r["provider"]): r for r in rows}
    lines = []
    for (kind, mode, prov), r in by.items():
        sdpa = by.get((kind, mode, "sdpa_causal"))
        if kind != "full" or not is_ours(prov) or sdpa is None:
            continue
        kernel = (f"kernel-only {sdpa['kernel_ms'] / r['kernel_ms']:.2f}x ({r['kernel_ms'] * 1e3:.1f} vs "
                  f"{sdpa['kernel_ms'] * 1e3:.1f} us), " if r.get("kernel_ms") and sdpa.get("kernel_ms") else "")
        lines.append(f"equal work (causal mask) {mode}: {prov} vs sdpa_causal: {kernel}"
                     f"through the op {sdpa['ms'] / r['ms']:.2f}x")
    return lines


def _faster(a, b) -> bool:
    """Whether row ``a`` is faster than ``b``: kernel-only where both have it, else through the op."""
    if a.get("kernel_ms") and b.get("kernel_ms"):
        return a["kernel_ms"] < b["kernel_ms"]
    return a["ms"] < b["ms"]


def summarize(rows, ref: Optional[str] = None):
    """Keeps flex128 and the faster of flex64/flex32 per (kind, mode) and adds each row's time over
    the reference dalle_fast row's, through the op (``speedup_of_dalle_fast``) and kernel-only
    (``kernel_speedup_of_dalle_fast``). ``ref``: that row's provider, by default the first dalle_fast
    row (with several Triton paths: the first of --triton-path). Returns new row dicts."""
    best = {}
    for r in rows:
        if r["provider"] in ("flex64", "flex32"):
            key = (r["kind"], r["mode"])
            if key not in best or _faster(r, best[key]):
                best[key] = r
    rows = [dict(r) for r in rows if r["provider"] not in ("flex64", "flex32") or best[(r["kind"], r["mode"])] is r]
    ref = ref or next((r["provider"] for r in rows if is_ours(r["provider"])), None)
    ours = {(r["kind"], r["mode"]): r for r in rows if r["provider"] == ref}
    for r in rows:
        base = ours.get((r["kind"], r["mode"])) if r["provider"] != ref else None
        r["speedup_of_dalle_fast"] = r["ms"] / base["ms"] if base else None
        k, kb = r.get("kernel_ms"), base.get("kernel_ms") if base else None
        r["kernel_speedup_of_dalle_fast"] = k / kb if k and kb else None
    return rows


#: speed targets: (label, mode, baselines (the fastest present is the one to beat), goal, basis):
#: basis "kernel" compares kernel-only times, "op" times through the op
_SPEEDUPS = (
    ("forward vs compiled FlexAttention, kernel-only (x faster)", "fwd", FLEX, 1.5, "kernel"),
    ("forward vs SDPA is_causal=True, kernel-only (x faster)", "fwd", ("sdpa_causal",), 2.0, "kernel"),
    ("backward vs compiled FlexAttention, kernel-only (x faster)", "bwd", FLEX, 1.3, "kernel"),
    ("forward vs compiled FlexAttention, through the op (x faster)", "fwd", FLEX, 1.5, "op"),
    ("fwd+bwd vs compiled FlexAttention, through the op (x faster)", "fwdbwd", FLEX, 1.3, "op"),
)


def targets(rows, missing=()):
    """The speed targets checked on ``rows`` (as ``summarize`` returns them), for each dalle_fast row
    (Triton path): per kind the speedups of ``_SPEEDUPS`` over the fastest FlexAttention and over
    SDPA causal, kernel-only forward TFLOP/s on the computed tiles, and kernel-only col time over
    row time per mode. Returns dicts of target, provider, kind, value, goal, met, missing.
    ``missing`` holds the (kind, mode, provider) that were asked for but not measured (skipped,
    failed): a target that needs one of them, or the kernel-only time of a row that has none, has
    ``met`` None ("unchecked", with the value of what was measured, or None), never True, since the
    one left out may be the one to beat (the fastest Flex block size) or dalle_fast itself. A target
    whose providers were not asked for (not in ``--providers``, mode not run) is left out."""
    missing = set(missing)
    by = {(r["kind"], r["mode"], r["provider"]): r for r in rows}
    kinds = list(dict.fromkeys([r["kind"] for r in rows] + [m[0] for m in missing]))
    ours_names = list(dict.fromkeys(p for _, _, p in list(by) + sorted(missing, key=str) if is_ours(p)))
    out = []

    def no_kernel_time(kind, mode, provs):
        return [f"{p} kernel time" for p in provs if (kind, mode, p) in by and by[(kind, mode, p)].get("kernel_ms") is None]

    for prov in ours_names:
        for kind in kinds:
            for label, mode, bases, goal, basis in _SPEEDUPS:
                field = "kernel_ms" if basis == "kernel" else "ms"
                ours = by.get((kind, mode, prov))
                times = [by[(kind, mode, b)][field] for b in bases
                         if (kind, mode, b) in by and by[(kind, mode, b)].get(field) is not None]
                lost = [p for p in (prov,) + bases if (kind, mode, p) in missing]
                if basis == "kernel":
                    lost += no_kernel_time(kind, mode, (prov,) + bases)
                v = min(times) / ours[field] if ours and ours.get(field) and times else None
                if v is None and not lost:
                    continue
                out.append(dict(target=label, provider=prov, kind=kind, value=v, goal=f">= {goal}",
                                met=None if lost else v >= goal, missing=lost))
            ours = by.get((kind, "fwd", prov))
            lost = [prov] if (kind, "fwd", prov) in missing else []
            if ours and ours.get("kernel_rate") is None:
                lost.append(f"{prov} kernel time")
            if ours or lost:
                v = ours.get("kernel_rate") if ours else None
                out.append(dict(target="forward TFLOP/s on the computed tiles, kernel-only", provider=prov, kind=kind,
                                value=v, goal=">= 300", met=None if lost else v >= 300, missing=lost))
        for mode in MODES:
            row, col = by.get(("row", mode, prov)), by.get(("col", mode, prov))
            lost = [f"{k} {prov}" for k in ("row", "col") if (k, mode, prov) in missing]
            lost += [f"{k} {n}" for k in ("row", "col") for n in no_kernel_time(k, mode, (prov,))]
            if (row and col) or (lost and all(k in kinds for k in ("row", "col"))):
                v = col["kernel_ms"] / row["kernel_ms"] if row and col and row.get("kernel_ms") and col.get("kernel_ms") \
                    else None
                out.append(dict(target=f"col time / row time ({mode}), kernel-only", provider=prov, kind="col", value=v,
                                goal="<= 1.15", met=None if lost else v <= 1.15, missing=lost))
    return out


def target_line(g) -> str:
    """One printed line of a ``targets`` entry: value, goal and met / NOT met / unchecked."""
    value = f"{g['value']:>8.2f}" if g["value"] is not None else f"{'-':>8}"
    verdict = (("met" if g["met"] else "NOT met") if g["met"] is not None
               else f"unchecked ({', '.join(g['missing'])} not measured)")
    return f"{g['target']:<62} {g.get('provider', 'dalle_fast'):<21} {g['kind']:<6} {value} {g['goal']:<8} {verdict}"


def write_outputs(args, rows, notes, machine, dtype, B, H, D, device, unit, goals=None, missing=()):
    """CSV and JSON of ``rows`` (with the speed ``goals`` checked, if given, and the (kind, mode,
    provider) asked for but not measured, ``missing``) and on CUDA the tuner's table, under
    ``--out``; returns the stem."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"attention_{device}"
    meta = dict(machine=machine, torch=torch.__version__, dalle_fast=dalle_fast.__version__, dtype=str(dtype),
                batch=B, heads=H, head_dim=D, text_len=args.text_len, image_size=args.image_size,
                rate_unit=unit, notes=notes, missing=sorted(list(m) for m in missing),
                kernel_time=None if device == "cpu" else
                "kernel_ms: CUDA-graph replays (kernel_method 'cuda graph'; median replay / calls captured) or the "
                "GPU time torch.profiler records per call ('profiler'); kernel_split: us per call per kernel name")
    with open(f"{stem}.json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, targets=goals or []), f, indent=1)
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["kind"])
        w.writeheader()
        for r in rows:  # the per-kernel split as name=us;name=us
            split = r.get("kernel_split")
            w.writerow(dict(r, kernel_split=";".join(f"{k}={v}" for k, v in split.items()) if split else ""))
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
