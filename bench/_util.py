"""Shared helpers of the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# The benchmarks use the installed dalle_fast, else this checkout's (with an in-place build): each
# script imports this module, from its own directory, before dalle_fast.
try:
    import dalle_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_isas() -> str:
    """The instruction sets each CPU provider runs with: dalle_fast's kernels (DALLE_FAST_CPU_ISA),
    PyTorch's own CPU kernels (ATEN_CPU_CAPABILITY; SDPA, FlexAttention) and oneDNN, which computes
    the GEMMs of both (ONEDNN_MAX_CPU_ISA). Restrict all three alike to compare on equal terms."""
    import dalle_fast

    return (f"dalle_fast {dalle_fast.cpu_isa()}, PyTorch {torch.backends.cpu.get_cpu_capability().lower()}, "
            f"oneDNN {os.environ.get('ONEDNN_MAX_CPU_ISA', 'best').lower()}")


def machine(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name += f", {torch.get_num_threads()} threads; ISA: {cpu_isas()}"
    cuda = f", CUDA {torch.version.cuda}" if device == "cuda" else ""
    return f"{platform.node()}: {name} (torch {torch.__version__}{cuda})"


def timeit(fn, device: str, min_time: float = 0.2, reps: int = 5) -> float:
    """Median seconds per call of fn over `reps` batches of calls that each last >= ~min_time / reps."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(min_time / reps / one))
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / n)
        else:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


#: calls captured in one CUDA graph: enough that one replay lasts about GRAPH_REPLAY_MS (judged by the
#: through-the-op time, which is at least the kernel time), at most GRAPH_MAX_CALLS
GRAPH_REPLAY_MS, GRAPH_MAX_CALLS, GRAPH_DEFAULT_CALLS = 2.0, 64, 8


def graph_time_ms(fn, repeats: int, op_ms: float | None = None, setup=None) -> float:
    """Kernel-only ms per call of ``fn`` on CUDA: a number of calls captured in one CUDA graph (no
    host work remains: the launches were recorded at capture), each of ``repeats`` replays timed
    with CUDA events, the median replay divided by the calls (as ``triton.testing.do_bench_cudagraph``).
    The calls run back to back as in the through-the-op timing, so what the previous call left in L2
    is there for the next; gaps between the kernels of a replay are counted. ``setup`` (a backward's
    retained forward) runs on the capture stream first and on the default stream afterwards. Raises
    where ``fn`` cannot be captured (a host synchronisation inside, an unsupported library call)."""
    calls = (max(1, min(GRAPH_MAX_CALLS, math.ceil(GRAPH_REPLAY_MS / op_ms))) if op_ms
             else GRAPH_DEFAULT_CALLS)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            if setup is not None:  # bwd: the retained forward on the capture stream
                setup()
            for _ in range(2):  # warm up on the capture stream (lazily created per-stream state)
                fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events) / calls
    finally:
        del graph
        if setup is not None:  # the retained forward back on the default stream
            try:
                setup()
            except Exception:  # noqa: BLE001 - the caller reports the failure that led here
                pass


def print_table(rows, columns):
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(columns, widths)))


def write_results(out_dir, name, rows, meta):
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    if rows:
        with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    print(f"wrote {out_dir}/{name}.json and .csv")


# ------------------------------------------------------------------------------------ arguments
def check_at_least(parser, args, minimum: int, *flags: str) -> None:
    """``parser.error`` (exit code 2) naming the flag unless each given ``--flag``'s value is at
    least ``minimum``; flags left at a ``None`` default are not checked."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}")


def check_finite(parser, args, *flags: str) -> None:
    """``parser.error`` unless each given ``--flag``'s (float) value is finite."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and not math.isfinite(value):
            parser.error(f"{flag} must be a finite number, got {value}")


def comma_list(parser, flag: str, spec: str, allowed) -> list:
    """The names of the comma list ``spec`` of ``flag``; ``parser.error`` on an empty list or a
    name not in ``allowed``."""
    names = spec.split(",")
    bad = [n for n in names if n not in allowed]
    if bad:
        parser.error(f"{flag}: unknown {', '.join(repr(b) for b in bad)}; choose from {', '.join(allowed)}")
    return names


def check_cuda(parser, device: str) -> None:
    """``parser.error`` when ``--device cuda`` is asked for on a machine without a CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
