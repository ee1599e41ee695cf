"""The benchmark scripts run on this machine's CPU (GPU providers skipped with a note) and report
what they claim to; each runs in a subprocess, as a user would start it."""

import contextlib
import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return env


def _run(script, *args, timeout=600, bench=BENCH, cwd=None):
    r = subprocess.run([sys.executable, str(bench / script), *args], env=_env(), capture_output=True, text=True,
                       timeout=timeout, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_attention_bench_runs_on_cpu(tmp_path):
    out = _run("attention.py", "--device", "cpu", "--kinds", "row", "--modes", "fwd", "--providers",
               "dalle_fast,sdpa_mask", "--batch", "1", "--heads", "2", "--repeats", "2", "--warmup", "1",
               "--out", str(tmp_path))
    rows = json.loads((tmp_path / "attention_cpu.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"dalle_fast", "sdpa_mask"}
    assert all(r["ms"] > 0 for r in rows)
    sdpa = next(r for r in rows if r["provider"] == "sdpa_mask")
    assert sdpa["speedup_of_dalle_fast"] > 0 and "sdpa_mask" in out
    # kernel-only time does not apply on CPU: empty in the files, "-" in the table
    assert all(r["kernel_ms"] is None and r["kernel_method"] is None and r["kernel_split"] is None for r in rows)
    with open(tmp_path / "attention_cpu.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["kernel_ms"] for r in table] == ["", ""] and all(float(r["ms"]) > 0 for r in table)
    header = next(ln for ln in out.splitlines() if ln.startswith("kind"))
    assert header.split()[:6] == ["kind", "mode", "provider", "ms", "kernel", "ms"]
    line = next(ln for ln in out.splitlines() if ln.startswith("row") and "sdpa_mask" in ln).split()
    assert line[4] == "-" and line[6] == "-" and line[8] == "-"


def test_linear_bench_runs_on_cpu(tmp_path):
    out = _run("linear.py", "--quick", "--rows", "3", "--isas", "all", "--threads", "1", "--out", str(tmp_path))
    res = json.loads((tmp_path / "linear.json").read_text())
    rows = res["results"]
    assert [(r["rows"], r["in_features"], r["out_features"]) for r in rows] == \
        [(3, 256, 768), (3, 256, 256)] * len({r["isa"] for r in rows})
    assert {r["isa"] for r in rows} == set(dalle_fast_isas())
    assert all(r["packed_us"] > 0 and r["torch_us"] > 0 and r["speedup_vs_torch"] > 0 for r in rows)
    assert all(("onednn_us" in r) == res["meta"]["onednn"] for r in rows)
    assert "packed_gflops" in out
    r = subprocess.run([sys.executable, str(BENCH / "linear.py"), "--rows", "0"], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--rows must be >= 1" in r.stderr


def dalle_fast_isas():
    import dalle_fast
    return dalle_fast.available_cpu_isas()


def test_l2_bandwidth_bench_runs_on_cpu(tmp_path):
    out = _run("l2_bandwidth.py", "--device", "cpu", "--sizes-mb", "0.25,2", "--out", str(tmp_path / "l2.json"))
    res = json.loads((tmp_path / "l2.json").read_text())
    assert res["device"] == "cpu" and [r["method"] for r in res["rows"]] == ["torch.sum"] * 2
    assert [r["size_mb"] for r in res["rows"]] == [0.25, 2.0] and all(r["gbps"] > 0 for r in res["rows"])
    assert "torch.sum" in out
    # a slow reading (a busy CPU's 0.25 MB sum: ~0.03 GB/s) is reported as such, not rounded to 0
    check = "import l2_bandwidth as L; assert L.rounded_gbps(0.031) == 0.031 and L.rounded_gbps(66.54) == 66.5"
    r = subprocess.run([sys.executable, "-c", check], env=_env(), cwd=BENCH, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for bad in ("0", "x", "-1"):
        r = subprocess.run([sys.executable, str(BENCH / "l2_bandwidth.py"), "--device", "cpu", "--sizes-mb", bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--sizes-mb" in r.stderr, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_l2_read_kernel_interpreted():
    """The GPU read kernel of bench/l2_bandwidth.py reads every element ``reps`` times (its
    per-program sums add up to reps times the buffer's), under the Triton interpreter on CPU
    tensors; and one launch reads an L2-sized buffer often enough (>= 512 MB) that its GPU time,
    not the ~5-12 us per call of Triton's launcher, is what gets timed (one read of 8 MB at an
    H100's ~6 TB/s L2 takes ~1.3 us, less than a launch)."""
    code = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import l2_bandwidth as L
x = torch.rand(3 * 2 * L.BLOCK)
out = torch.empty(3)
L._read_kernel()[(3,)](x, out, 2 * L.BLOCK, 3, BLOCK=L.BLOCK)
expect = 3 * x.view(3, -1).double().sum(1)
assert torch.allclose(out.double(), expect, rtol=1e-5), (out, expect)
for mb in (8, 16, 24, 32):
    assert L.reads_per_launch(int(mb * 1e6)) * mb * 1e6 >= 512e6, mb
assert L.reads_per_launch(int(1024e6)) == 1
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code, str(BENCH)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_host_overhead_bench_counts_the_launches(tmp_path):
    _run("host_overhead.py", "--calls", "20", "--rounds", "2", "--out", str(tmp_path / "h.json"))
    res = json.loads((tmp_path / "h.json").read_text())
    assert res["stubbed"] and res["device"] == "cpu"
    launches = {r["call"]: r["launches"] for r in res["rows"]}
    # forward: one kernel and the repair pass over its row flags; backward: dQ (with delta), dK/dV
    # and the dQ repair pass
    assert launches == {"fwd (no_grad)": 2, "fwd (autograd)": 2, "bwd": 3, "fwd+bwd": 5}
    assert all(r["us"] > 0 for r in res["rows"])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernel_resources_cli(tmp_path):
    """Defaults, the other candidates and the opt-in flat forward's (cut to one each to keep the
    compile time down), as ``python bench/kernel_resources.py`` lists them."""
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("kr", {str(BENCH / "kernel_resources.py")!r})
kr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kr)  # unsets TRITON_INTERPRET before the kernels are defined
K = kr.K
defaults = K.default_configs(32, kr.torch.bfloat16)
K.CANDIDATES.update(fwd=(defaults[0], K.TileConfig(64, 32, 4, 3)), dkdv=(defaults[1],), dq=(defaults[2],))
K.FLAT_FWD_CONFIGS = K.FLAT_FWD_CONFIGS[1:2]
kr.main(["--kinds", "row", "--head-dims", "32"])
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("fwd ", "dkdv ", "dq ", "fwd_flat "))]
    assert [ln.split()[0] for ln in lines] == ["fwd", "fwd", "dkdv", "dq", "fwd_flat"], r.stdout
    assert all("default" in ln for ln in lines[:1] + lines[2:4]) and "default" not in lines[1] + lines[4]
    assert not any("SPILLS" in ln or "SERIALIZED" in ln or "failed" in ln for ln in lines), r.stdout
    hopper = [ln for ln in r.stdout.splitlines() if ln.startswith("hopper-")]
    assert [ln.split()[0] for ln in hopper] == ["hopper-fwd", "hopper-bwd", "hopper-bwd-det"], r.stdout
    assert not any("failed" in ln for ln in hopper) and "SPILLS" not in hopper[0], r.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_tuning_log_table(tmp_path, monkeypatch, capsys):
    """bench/attention.py turns the tuner's log into per-candidate rows with TFLOP/s on the computed
    tiles of each candidate's tile shape."""
    from dalle_fast import KINDS, Layout
    from dalle_fast._triton_ops import kernels

    K = kernels()
    bench = _bench_attention()
    fast, slow = K.TileConfig(64, 64, 4, 3), K.TileConfig(128, 32, 4, 3)
    consts = dict(T=256, S=32, KIND=KINDS.index("row"), KS=11, DIL=1, HEAD_DIM=64)
    key = K._tuning_key("fwd", 1280, 8, 16, consts, torch.bfloat16, torch.device("cpu"))  # the tuner's own key
    monkeypatch.setattr(K, "TUNING_LOG", [
        dict(kernel="fwd", key=key, config=fast, ms=0.05, n_regs=128, n_spills=0, note=""),
        dict(kernel="fwd", key=key, config=slow, ms=0.1, n_regs=200, n_spills=0, note=""),
        dict(kernel="fwd", key=key, config=fast._replace(order=K.ORDER_HEAVY), ms=0.04, n_regs=128, n_spills=0,
             note=""),
        dict(kernel="fwd", key=key, config=K.TileConfig(128, 64, 4, 4), ms=None, n_regs=255, n_spills=8,
             note="spills: not timed"),
        dict(kernel="fwd", key=key, config=K.TileConfig(128, 64, 8, 3, maxnreg=128), ms=0.06, n_regs=128,
             n_spills=0, note=""),
    ])
    path = tmp_path / "tuning.csv"
    bench.write_tuning_log(str(path), 8 * 16, 256, 32)
    text = path.read_text().splitlines()
    assert len(text) == 6 and text[0].startswith("kernel,kind,seq")
    assert [r["order"] for r in csv.DictReader(text)] == ["0", "0", "1", "0", "0"]
    assert [r["maxnreg"] for r in csv.DictReader(text)] == ["0", "0", "0", "0", "128"]
    pairs = Layout("row", 256, 32).tile_table(1280, 64, 64).computed_pairs()
    expect = 4 * pairs * 64 * 128 / 0.05e-3 / 1e12
    got = float(next(csv.DictReader(text))["tflops"])
    assert abs(got - expect) < 0.1, (got, expect)
    # L2 traffic of row 64 x 64 at seq 1280, by hand: 20 query tiles of 64 rows; 105 (query, key)
    # tile pairs (text query tiles 1 + 2 + 3 + 4, the first image tile 4 text + itself, the other 15
    # image tiles 4 text + the previous + itself); 128 bytes per bf16 row of head_dim 64: q read
    # once, K and V per pair, out (+ 4-byte lse) written once; x 128 batch*heads
    moved = 128 * (1280 * 128 + 2 * 105 * 64 * 128 + 1280 * (128 + 4))
    first = next(csv.DictReader(text))
    assert abs(float(first["l2_mb"]) - moved / 1e6) < 0.1, (first["l2_mb"], moved)
    assert abs(float(first["l2_tbs"]) - moved / 0.05e-3 / 1e12) < 0.01, first["l2_tbs"]
    table = Layout("row", 256, 32).tile_table(1280, 64, 64)  # the flat forward reloads q with every pair
    assert bench.l2_traffic("fwd", table, 64, 2, 128, flat=32) == moved + 128 * (105 - 20) * 64 * 128
    with pytest.raises(ValueError, match="kernel"):
        bench.l2_traffic("bwd", table, 64, 2, 128)
    summary = capsys.readouterr().out
    assert "best 64x64 w4 s3 o1 40.0 us 352 TFLOP/s, L2 6.6 TB/s (model)" in summary, summary
    assert "worst 128x32 w4 s3 o0 100.0 us" in summary
    assert "best capped 128x64 w8 s3 r128 o0 60.0 us" in summary


def _bench_attention():
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH / "attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def row(kind, mode, provider, ms, rate=0.0, kernel_ms=None, kernel_rate=None):
    """A benchmark result row as bench/attention.py's main collects them."""
    return dict(kind=kind, mode=mode, provider=provider, ms=ms, rate=rate, peak_mib=None, kernel_ms=kernel_ms,
                kernel_rate=kernel_rate, kernel_method="cuda graph" if kernel_ms else None, kernel_split=None)


def test_speed_targets_table():
    """bench/attention.py checks the speed targets against the fastest FlexAttention present and SDPA
    causal: kernel-only forward and backward, forward TFLOP/s and col / row on kernel-only times,
    forward and forward + backward through the op on the op's times; missing providers or modes
    leave targets out."""
    bench = _bench_attention()
    rows = bench.summarize([
        row("row", "fwd", "dalle_fast", 0.25, 64.0, 0.05, 320.0), row("row", "fwd", "flex128", 0.3, 0, 0.1),
        row("row", "fwd", "flex64", 0.28, 0, 0.07), row("row", "fwd", "sdpa_causal", 0.2, 0, 0.09),
        row("row", "bwd", "dalle_fast", 0.4, 0, 0.2), row("row", "bwd", "flex128", 0.5, 0, 0.3),
        row("col", "fwd", "dalle_fast", 0.26, 0, 0.06, 250.0), row("col", "fwd", "flex128", 0.3, 0, 0.2),
    ])
    got = {(g["target"], g["kind"]): g for g in bench.targets(rows)}
    flex = got[("forward vs compiled FlexAttention, kernel-only (x faster)", "row")]
    assert flex["value"] == pytest.approx(0.07 / 0.05) and not flex["met"]  # flex64 is the one to beat
    op = got[("forward vs compiled FlexAttention, through the op (x faster)", "row")]
    assert op["value"] == pytest.approx(0.28 / 0.25) and not op["met"]  # the op's own times
    assert got[("forward vs SDPA is_causal=True, kernel-only (x faster)", "row")]["value"] == pytest.approx(1.8)
    assert got[("backward vs compiled FlexAttention, kernel-only (x faster)", "row")]["met"]  # 1.5 >= 1.3
    assert got[("forward TFLOP/s on the computed tiles, kernel-only", "row")]["met"]
    assert not got[("forward TFLOP/s on the computed tiles, kernel-only", "col")]["met"]
    ratio = got[("col time / row time (fwd), kernel-only", "col")]
    assert ratio["value"] == pytest.approx(1.2) and not ratio["met"]
    assert ("forward vs SDPA is_causal=True, kernel-only (x faster)", "col") not in got  # no sdpa_causal for col
    assert ("col time / row time (bwd), kernel-only", "col") not in got and len(got) == 9
    assert all(g["provider"] == "dalle_fast" for g in got.values())
    # flex64 and flex32: the faster kernel-only one stays, even if slower through the op
    kept = bench.summarize([row("row", "fwd", "flex64", 0.3, 0, 0.08), row("row", "fwd", "flex32", 0.2, 0, 0.09)])
    assert [r["provider"] for r in kept] == ["flex64"]


def test_speed_targets_per_triton_path_and_ratios():
    """With two Triton paths each dalle_fast row gets its own targets; ratios (through the op and
    kernel-only) are to the first dalle_fast row; kind full compares with SDPA causal at equal work."""
    bench = _bench_attention()
    rows = bench.summarize([
        row("full", "fwd", "dalle_fast[portable]", 0.2, 0, 0.12), row("full", "fwd", "dalle_fast[hopper]", 0.15, 0, 0.04),
        row("full", "fwd", "sdpa_causal", 0.1, 0, 0.085),
    ])
    by = {r["provider"]: r for r in rows}
    assert by["dalle_fast[portable]"]["speedup_of_dalle_fast"] is None
    assert by["dalle_fast[hopper]"]["kernel_speedup_of_dalle_fast"] == pytest.approx(0.04 / 0.12)
    assert by["sdpa_causal"]["kernel_speedup_of_dalle_fast"] == pytest.approx(0.085 / 0.12)
    sdpa = {g["provider"]: g for g in bench.targets(rows) if g["target"].startswith("forward vs SDPA")}
    assert sdpa["dalle_fast[portable]"]["value"] == pytest.approx(0.085 / 0.12) and not sdpa["dalle_fast[portable]"]["met"]
    assert sdpa["dalle_fast[hopper]"]["value"] == pytest.approx(0.085 / 0.04) and sdpa["dalle_fast[hopper]"]["met"]
    lines = bench.equal_work_lines(rows)
    assert lines == ["equal work (causal mask) fwd: dalle_fast[portable] vs sdpa_causal: kernel-only 0.71x "
                     "(120.0 vs 85.0 us), through the op 0.50x",
                     "equal work (causal mask) fwd: dalle_fast[hopper] vs sdpa_causal: kernel-only 2.12x "
                     "(40.0 vs 85.0 us), through the op 0.67x"]
    assert "dalle_fast[hopper]" in bench.target_line(sdpa["dalle_fast[hopper]"])


def test_graph_time_ms_replays_a_captured_graph(monkeypatch):
    """Kernel-only time by CUDA graph, on a fake torch.cuda: the backward case's retained forward is
    redone on the capture stream first (autograd runs a backward on its forward's stream), the case
    is warmed up there, ceil(2 ms / op time) calls are captured, and the median replay over the calls
    is the time per call; afterwards the retained forward is back on the default stream."""
    bench = _bench_attention()
    state = dict(stream="default", capturing=False, clock=0.0)
    log = []

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def stream(s):
        prev, state["stream"] = state["stream"], s.name
        try:
            yield
        finally:
            state["stream"] = prev

    class Graph:
        calls = 0

        def replay(self):
            state["clock"] += self.calls * 0.03 + 0.01  # 30 us per captured call, 10 us per launch

    @contextlib.contextmanager
    def graph(g, stream=None):
        prev, state["stream"], state["capturing"], start = state["stream"], stream.name, True, len(log)
        try:
            yield
        finally:
            g.calls = sum(1 for e in log[start:] if e[0] == "fn")
            state["stream"], state["capturing"] = prev, False

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = state["clock"]

        def elapsed_time(self, end):
            return end.t - self.t

    for name, obj in dict(Stream=Stream, stream=stream, CUDAGraph=Graph, graph=graph, Event=Event,
                          synchronize=lambda: None, current_stream=lambda: Stream("default")).items():
        monkeypatch.setattr(torch.cuda, name, obj)
    case = bench.Case(lambda: log.append(("fn", state["stream"], state["capturing"])), 1,
                      lambda: log.append(("setup", state["stream"], state["capturing"])))
    ms = bench.graph_time_ms(case.fn, repeats=5, op_ms=0.25, setup=case.setup)
    calls = math.ceil(bench.GRAPH_REPLAY_MS / 0.25)
    assert ms == pytest.approx(0.03 + 0.01 / calls)
    assert log == ([("setup", "side", False)] + [("fn", "side", False)] * 2 + [("fn", "side", True)] * calls
                   + [("setup", "default", False)])
    # a case that cannot be captured raises (the caller falls back to the profiler)
    log.clear()

    def fails():
        if state["capturing"]:
            raise RuntimeError("operation not permitted when stream is capturing")
    with pytest.raises(RuntimeError, match="capturing"):
        bench.graph_time_ms(fails, repeats=3, setup=lambda: log.append(state["stream"]))
    assert log == ["side", "default"]


def test_decode_kernel_columns(monkeypatch):
    """bench/decode.py's kernel-only columns: us from the CUDA-graph time sized by the op's time,
    GB/s and % of HBM from the bytes; a case that cannot be captured gets None (and a message)
    instead of ending the run; the data sheet's bandwidth is found by the card's name."""
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = []

    def graph(fn, repeats, op_ms=None, setup=None):
        seen.append((fn.__name__, op_ms))
        if fn.__name__ == "sdpa":
            raise RuntimeError("operation not permitted when stream is capturing")
        return 0.02  # ms

    def case(name):
        def fn():
            pass
        fn.__name__ = name
        return fn

    monkeypatch.setattr(bench, "graph_time_ms", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    cols = bench.kernel_times(dict(ours=(case("ours"), 40e-6, 60_000_000), sdpa=(case("sdpa"), 90e-6, None)), 4.0)
    assert seen == [("ours", pytest.approx(0.04)), ("sdpa", pytest.approx(0.09))]
    assert cols == dict(ours_kernel_us=20.0, ours_kernel_GBps=3000.0, ours_hbm_pct=75.0, sdpa_kernel_us=None)
    assert "ours_hbm_pct" not in bench.kernel_times(dict(ours=(case("ours"), 40e-6, 1000)), None)
    assert bench.hbm_tbs("NVIDIA H200") == 4.8 and bench.hbm_tbs("NVIDIA H100 80GB HBM3") == 3.35
    assert bench.hbm_tbs("NVIDIA GeForce RTX 4090") is None
    rows = [dict(kind=k, batch=b, pos=p, ours_kernel_us=20.0, ours_kernel_GBps=3000.0, ours_hbm_pct=62.5,
                 shared_kernel_us=None, shared_kernel_GBps=None) for k in ("row", "col") for b in (1, 64)
            for p in (256, 1279)]
    assert bench.hbm_lines(rows) == [
        "decode attention kernel, B=64, row at position 1279: ours 20.0 us, 3000.0 GB/s = 62.5% of HBM",
        "decode attention kernel, B=64, col at position 1279: ours 20.0 us, 3000.0 GB/s = 62.5% of HBM"]
    assert bench.hbm_lines([dict(kind="row", batch=16, pos=3, ours_us=1.0)]) == []


def _bench_module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cuda_resources_parses_ptxas():
    """bench/cuda_resources.py reads ptxas -v's report per entry function (a kernel without a
    spill line keeps zeros; registers are the first "Used" line of each entry)."""
    res = _bench_module("cuda_resources")
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1aPf' for 'sm_90a'
ptxas info    : Function properties for _Z1aPf
    16 bytes stack frame, 20 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 16 bytes cumulative stack size, 2288 bytes smem
ptxas info    : Compile time = 1.0 ms
ptxas info    : Compiling entry function '_Z1bv' for 'sm_90a'
ptxas info    : Used 31 registers, used 0 barriers
"""
    assert res.parse_ptxas(text) == [
        dict(kernel="_Z1aPf", arch="sm_90a", registers=64, spill_stores=20, spill_loads=32, stack=16, smem=2288),
        dict(kernel="_Z1bv", arch="sm_90a", registers=31, spill_stores=0, spill_loads=0, stack=0, smem=0)]


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="needs nvcc")
def test_cuda_decode_kernel_does_not_spill(tmp_path):
    """The CUDA decode kernels compiled for sm_90a with the extension's flags: no spills, and at most
    the 64 registers per thread that 8 resident blocks of 128 threads allow (the launch plan's
    assumption, decode_plan_splits)."""
    _run("cuda_resources.py", "--sources", "decode_attention", "--json", str(tmp_path / "r.json"), timeout=900)
    rows = json.loads((tmp_path / "r.json").read_text())
    decode = [r for r in rows if "decode_kernel<" in r["name"]]
    assert len(decode) == 9 and len(rows) == 18  # 3 dtypes x 3 head dims, each with its merge kernel
    for r in rows:
        assert r["spill_stores"] == r["spill_loads"] == 0 and r["stack"] == 0, r
    assert all(r["registers"] <= 64 for r in decode), decode


def test_time_kernels_method_per_provider(monkeypatch):
    """Each CUDA case gets a kernel-only time by CUDA graph, or by the profiler where capture fails
    (the reason in a note), or none when both fail; the per-kernel split comes from the profiler for
    the names asked (the dalle_fast rows)."""
    bench = _bench_attention()

    def graph(fn, repeats, op_ms=None, setup=None):
        if fn.__name__ in ("flex", "broken"):
            raise RuntimeError("operation not permitted when stream is capturing")
        return 0.04

    def prof(fn, calls=10):
        if fn.__name__ == "broken":
            raise RuntimeError("torch.profiler recorded no GPU activity")
        return {"_attn_bwd_dkdv": 120.0, "_attn_bwd_dq": 60.0} if fn.__name__ == "ours" else {"k": 30.0, "j": 20.0}

    def case(name):
        def fn():
            pass
        fn.__name__ = name
        return bench.Case(fn, 1)

    monkeypatch.setattr(bench, "graph_time_ms", graph)
    monkeypatch.setattr(bench, "profiler_times", prof)
    res, notes = bench.time_kernels({"dalle_fast[portable]": case("ours"), "flex128": case("flex"),
                                     "xformers": case("broken")}, {}, 5, split=["dalle_fast[portable]"])
    assert res["dalle_fast[portable]"] == dict(kernel_ms=0.04, kernel_method="cuda graph",
                                               kernel_split={"_attn_bwd_dkdv": 120.0, "_attn_bwd_dq": 60.0})
    assert res["flex128"]["kernel_method"] == "profiler" and res["flex128"]["kernel_ms"] == pytest.approx(0.05)
    assert res["flex128"]["kernel_split"] is None
    assert notes["flex128"].startswith("kernel time by profiler (CUDA-graph capture failed: RuntimeError: operation")
    assert res["xformers"]["kernel_ms"] is None and res["xformers"]["kernel_method"] is None
    assert "no kernel time" in notes["xformers"] and "no GPU activity" in notes["xformers"]
    assert "dalle_fast[portable]" not in notes


def test_gpu_event_times_sums_device_events_per_name():
    """The profiler's kernel time: device (CUDA) events only, summed per kernel name over the calls."""
    from torch.autograd import DeviceType

    bench = _bench_attention()

    def ev(name, device, us):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [ev("_attn_bwd_dkdv", DeviceType.CUDA, 100.0), ev("_attn_bwd_dq", DeviceType.CUDA, 60.0),
              ev("_attn_bwd_dq", DeviceType.CUDA, 64.0), ev("aten::empty", DeviceType.CPU, 500.0),
              ev("Memset (Device)", DeviceType.CUDA, 2.0), ev("_attn_bwd_dkdv", DeviceType.CUDA, 102.0)]
    got = bench.gpu_event_times(events, 2)
    assert got == {"_attn_bwd_dkdv": 101.0, "_attn_bwd_dq": 62.0, "Memset (Device)": 1.0}
    assert list(got) == ["_attn_bwd_dkdv", "_attn_bwd_dq", "Memset (Device)"]


def test_dalle_fast_rows_follow_the_triton_path(monkeypatch):
    """--triton-path: one dalle_fast[<path>] row per path, by default the path triton_path() picks;
    every call of such a row (the retained forward of bwd, the backward, fwd+bwd) runs inside
    use_triton_path(path). A dalle_fast without the switch runs its one (portable) path and skips
    hopper with a note."""
    import dalle_fast
    from dalle_fast import Layout

    bench = _bench_attention()
    for name in ("use_triton_path", "triton_path"):
        monkeypatch.delattr(dalle_fast, name, raising=False)
    assert bench.dalle_fast_rows("cpu", None) == ["dalle_fast"]
    assert bench.dalle_fast_rows("cuda", None) == ["dalle_fast"]
    assert bench.dalle_fast_rows("cuda", "portable,hopper") == ["dalle_fast[portable]", "dalle_fast[hopper]"]
    assert bench.path_context("dalle_fast[portable]") is contextlib.nullcontext
    with pytest.raises(bench.Skip, match="no 'hopper' Triton path"):
        bench.path_context("dalle_fast[hopper]")

    current = [None]

    @contextlib.contextmanager
    def use_triton_path(name):
        prev, current[0] = current[0], name
        try:
            yield
        finally:
            current[0] = prev

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            seen.append(("fwd", current[0]))
            return q.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", current[0]))
            return g

    monkeypatch.setattr(dalle_fast, "use_triton_path", use_triton_path, raising=False)
    monkeypatch.setattr(dalle_fast, "triton_path", lambda device=None: "hopper", raising=False)
    monkeypatch.setattr(dalle_fast, "sparse_attention", lambda q, k, v, layout, backend=None: Probe.apply(q) + k + v)
    assert bench.dalle_fast_rows("cuda", None) == ["dalle_fast[hopper]"]
    layout = Layout("row", 8, 2)
    args = (layout, 1, 1, layout.seq_len, 4, torch.float32, "cpu")
    for mode, expect in (("fwd", ["fwd"]), ("bwd", ["fwd", "bwd"]), ("fwdbwd", ["fwd", "bwd"])):
        seen.clear()
        case = bench.prepare_case("dalle_fast[hopper]", args[0], mode, *args[1:])
        case.fn()
        assert seen[-len(expect):] == [(e, "hopper") for e in expect] and current[0] is None, (mode, seen)
        seen.clear()
        bench.prepare_case("dalle_fast", args[0], mode, *args[1:]).fn()  # plain rows: no path switch
        assert {p for _, p in seen} == {None}


def test_schedule_model():
    """bench/schedule_model.py: list scheduling as documented (a hand-checked case), and on the
    DALL-E tables the tile-major order never models slower than batch*head-major for dK/dV."""
    spec = importlib.util.spec_from_file_location("schedule_model", BENCH / "schedule_model.py")
    sm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm)
    # 2 slots: 3 -> slot A (0-3), 1 -> B (0-1), 1 -> B (1-2), 3 -> B (2-5): finish 5; heavy first: 4
    assert sm.makespan([3, 1, 1, 3], 2) == 5 and sm.makespan([3, 3, 1, 1], 2) == 4
    out = _run("schedule_model.py", "--kinds", "row,conv", "--bh", "24")
    assert "o0 / o1" in out
    from dalle_fast import Layout

    for kind in ("row", "col", "conv", "full"):
        layout = Layout(kind, 256, 32)
        assert sm.row_lengths(layout, 1280, "fwd", 64, 64)[-1] >= sm.row_lengths(layout, 1280, "fwd", 64, 64)[0]
        r = sm.model(layout, 1280, 64, "dkdv", 32, 128, 1, 132, 1.5)
        assert 1.0 <= r["o1"] <= r["o0"], r


def test_forward_l2_model_old_and_new_tiles():
    """bench/schedule_model.py's L2 bytes per forward at the default GPU shape (bfloat16, B*H = 8 x 16,
    D = 64, text 256 + 32 x 32): hand counts of the row tables, the portable forward equal to the
    tuning table's model (262.8 MB in all, the figure the 128-row design is measured against) and
    the Hopper forward's 128-row query tiles at or under 180 MB read; printed by the script."""
    spec = importlib.util.spec_from_file_location("schedule_model", BENCH / "schedule_model.py")
    sm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm)
    from dalle_fast import Layout

    layout, bh, row_bytes = Layout("row", 256, 32), 128, 64 * 2
    written = bh * 1280 * (row_bytes + 4)  # out and the float32 lse, once per query row
    # 64 x 64: 105 (query tile, key tile) pairs (test_tuning_log_table); 128 x 64: 10 query tiles,
    # text tiles 2 + 4 pairs, the first image tile 4 text + 2 image, the other 7 each 4 text + the
    # key tile holding its first row - 32 + its own 2: 2 + 4 + 6 + 7 * 7 = 61
    old = sm.forward_l2(layout, 1280, bh, 64, 64, 64)
    new = sm.forward_l2(layout, 1280, bh, 64, 128, 64)
    assert (old["pairs"], new["pairs"]) == (105, 61)
    for r, pairs in ((old, 105), (new, 61)):
        assert r["written"] == written
        assert r["read"] == bh * (1280 * row_bytes + 2 * pairs * 64 * row_bytes)  # q once, K and V per pair
    bench = _bench_attention()
    table = layout.tile_table(1280, 64, 64)
    assert old["total"] == bench.l2_traffic("fwd", table, 64, 2, bh) == 262_799_360
    wide = sm.forward_l2(layout, 1280, bh, 64, 128, 128)
    assert new["read"] <= 180e6 and wide["read"] <= 180e6 and new["total"] <= 180e6, (new, wide)
    assert new["total"] < 0.65 * old["total"]
    out = _run("schedule_model.py", "--kinds", "row", "--bh", "128")
    lines = {tuple(ln.split()[:3]): ln.split() for ln in out.splitlines() if ln.startswith("row ")}
    assert lines[("row", "portable", "64x64")][3:7] == ["105", "241.2", "21.6", "262.8"], out
    assert lines[("row", "hopper", "128x64")][3:7] == ["61", "148.9", "21.6", "170.5"], out
    assert ("row", "hopper", "128x128") in lines and "us @ 5.5 TB/s" in out


_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
# small valid arguments the bad one is appended to (argparse keeps the last value of a flag), so
# that a script still ignoring the bad value would only run a tiny problem
_SMALL = {
    "cuda_resources.py": [],
    "attention.py": ["--device", "cpu", "--kinds", "row", "--modes", "fwd", "--providers", "sdpa_mask", "--batch", "1",
                     "--heads", "1", "--head-dim", "8", "--text-len", "4", "--image-size", "2", "--repeats", "1",
                     "--warmup", "0"],
    "host_overhead.py": ["--calls", "2", "--rounds", "1", "--batch", "1", "--heads", "1"],
    "schedule_model.py": ["--kinds", "row", "--bh", "2"],
    "kernel_resources.py": ["--kinds", "row", "--defaults-only"],
    "decode.py": ["--device", "cpu", "--quick", "--heads", "1", "--head-dim", "8", "--text-len", "4",
                  "--image-size", "2"],
    "sampling.py": ["--quick"],
    "generate.py": ["--preset", "tiny", "--modes", "sparse", "--batch", "1", "-n", "1", "--repeat", "1"],
    "l2_bandwidth.py": ["--device", "cpu", "--sizes-mb", "0.1"],
    "ncu_forward.py": ["--kinds", "row", "--batch", "1", "--heads", "1"],
    "gpu_decide.py": ["--dir", "."],
    "adapter_sweep.py": ["--quick"],
}
_BAD_ARGS = [  # (script, flag named in the error, the bad arguments)
    ("attention.py", "--batch", ["--batch", "0"]),
    ("attention.py", "--heads", ["--heads", "0"]),
    ("attention.py", "--batch", ["--batch", "-1"]),
    ("attention.py", "--head-dim", ["--head-dim", "0"]),
    ("attention.py", "--text-len", ["--text-len", "0"]),
    ("attention.py", "--image-size", ["--image-size", "0"]),
    ("attention.py", "--repeats", ["--repeats", "0"]),
    ("attention.py", "--repeats", ["--repeats", "-3"]),
    ("attention.py", "--warmup", ["--warmup", "-1"]),
    ("attention.py", "--modes", ["--modes", "fwd,bw"]),
    ("attention.py", "--providers", ["--providers", "sdpa_mask,foo"]),
    ("attention.py", "--kinds", ["--kinds", "row,foo"]),
    ("attention.py", "--head-dim", ["--providers", "dalle_fast", "--head-dim", "300"]),
    ("attention.py", "--triton-path", ["--triton-path", "portable,foo"]),
    ("attention.py", "--triton-path", ["--triton-path", "hopper"]),  # CPU: no Triton path to pick
    ("attention.py", "--kernel-split", ["--kernel-split"]),
    pytest.param("host_overhead.py", "--kind", ["--kind", "foo"], marks=_TRITON),
    pytest.param("host_overhead.py", "--batch", ["--batch", "0"], marks=_TRITON),
    pytest.param("host_overhead.py", "--calls", ["--calls", "0"], marks=_TRITON),
    pytest.param("host_overhead.py", "--rounds", ["--rounds", "0"], marks=_TRITON),
    pytest.param("host_overhead.py", "--head-dim", ["--head-dim", "48"], marks=_TRITON),
    ("schedule_model.py", "--text-len", ["--text-len", "0"]),
    ("schedule_model.py", "--kinds", ["--kinds", "row,foo"]),
    ("schedule_model.py", "--overhead", ["--overhead", "nan"]),
    ("schedule_model.py", "--l2-tbs", ["--l2-tbs", "0"]),
    ("schedule_model.py", "--head-dim", ["--head-dim", "0"]),
    pytest.param("kernel_resources.py", "--kinds", ["--kinds", "foo"], marks=_TRITON),
    pytest.param("kernel_resources.py", "--dtypes", ["--dtypes", "foo"], marks=_TRITON),
    pytest.param("kernel_resources.py", "--head-dims", ["--head-dims", "48"], marks=_TRITON),
    ("decode.py", "--candidates", ["--candidates", "0"]),
    ("decode.py", "--heads", ["--heads", "-2"]),
    ("decode.py", "--hbm-tbs", ["--hbm-tbs", "0"]),
    ("cuda_resources.py", "--sources", ["--sources", "decode_attention,foo"]),
    pytest.param("decode.py", "--device cuda", ["--device", "cuda"], marks=_NO_CUDA),
    pytest.param("sampling.py", "--device cuda", ["--device", "cuda"], marks=_NO_CUDA),
    ("generate.py", "--sample-steps", ["--modes", "none", "--sample-steps", "0"]),
    ("generate.py", "-n", ["-n", "0"]),
    ("generate.py", "--modes", ["--modes", "sparse,foo"]),
    ("generate.py", "--batch", ["--batch", "-1"]),
    ("generate.py", "--repeat", ["--repeat", "0"]),
    pytest.param("generate.py", "--device cuda", ["--device", "cuda"], marks=_NO_CUDA),
    ("generate.py", "--device", ["--device", "cuda:7"]),
    ("l2_bandwidth.py", "--sizes-mb", ["--sizes-mb", "nan"]),
    ("l2_bandwidth.py", "--sizes-mb", ["--sizes-mb", "0.1,inf"]),
    ("ncu_forward.py", "--paths", ["--paths", "hopper,foo"]),
    ("ncu_forward.py", "--kinds", ["--kinds", "row,foo"]),
    ("ncu_forward.py", "--batch", ["--batch", "0"]),
    pytest.param("ncu_forward.py", "--device cuda", [], marks=_NO_CUDA),
    ("gpu_decide.py", "--dir", ["--dir", "no-such-folder"]),
    ("adapter_sweep.py", "--only", ["--only", "small-vocab-8x8,foo"]),
    ("adapter_sweep.py", "--repeat", ["--repeat", "0"]),
]


@pytest.mark.parametrize("script, flag, bad", _BAD_ARGS)
def test_bench_scripts_refuse_bad_arguments(script, flag, bad, tmp_path):
    """A bad command-line argument ends in argparse's error (exit code 2, one line naming the flag),
    not in a traceback, a run on a default in its place, or a run that reports nonsense."""
    out = [] if script in ("schedule_model.py", "kernel_resources.py", "cuda_resources.py") else ["--out", str(tmp_path / "out")]
    if script == "gpu_decide.py":  # its --out is a file
        out = ["--out", str(tmp_path / "out" / "decide.json")]
    r = subprocess.run([sys.executable, str(BENCH / script), *_SMALL[script], *out, *bad], env=_env(),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, f"rc={r.returncode}\n" + r.stdout[-2000:] + r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and flag in last, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_bench_scripts_write_to_bench_out(tmp_path):
    """decode.py, sampling.py and generate.py write into --out when given, else into bench/out of
    the checkout they are in (not of the current directory): here a copy of the scripts under
    tmp_path/repo, run from elsewhere."""
    bench = tmp_path / "repo" / "bench"
    bench.mkdir(parents=True)
    for name in ("_util.py", "decode.py", "sampling.py", "generate.py"):
        shutil.copy(BENCH / name, bench / name)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    _run("decode.py", *_SMALL["decode.py"], "--candidates", "2", "--out", str(tmp_path / "explicit"), bench=bench,
         cwd=cwd)
    _run("sampling.py", "--device", "cpu", "--quick", bench=bench, cwd=cwd)
    _run("generate.py", *_SMALL["generate.py"], bench=bench, cwd=cwd)
    decode = json.loads((tmp_path / "explicit" / "decode.json").read_text())
    assert decode["meta"]["quick"] and decode["results"] and (tmp_path / "explicit" / "decode.csv").is_file()
    out = bench / "out"
    sampling = json.loads((out / "sampling.json").read_text())
    assert sampling["meta"]["quick"] and sampling["results"] and (out / "sampling.csv").is_file()
    generate = json.loads((out / "generate.json").read_text())
    assert [r["mode"] for r in generate["results"]] == ["sparse"] and (out / "generate.csv").is_file()
    assert not (cwd / "bench").exists() and not (bench / "out" / "decode.json").exists()


def test_attention_bench_survives_a_provider_failing_when_called(tmp_path, monkeypatch):
    """A baseline that raises at its first call (a compile error, out of memory, flash-attn refusing
    the GPU: all happen in the call, not when the provider is made) is noted as failed and the other
    providers are still measured, instead of the exception ending the run."""
    bench = _bench_attention()
    make = bench.make_provider

    def failing(name, *args):
        attn, pairs = make(name, *args)
        if name == "sdpa_causal":
            def attn(q, k, v):
                raise RuntimeError("no kernel image for this GPU")
        return attn, pairs

    monkeypatch.setattr(bench, "make_provider", failing)
    rows = bench.main(["--device", "cpu", "--kinds", "row", "--modes", "fwd,fwdbwd", "--providers",
                       "dalle_fast,sdpa_mask,sdpa_causal", "--batch", "1", "--heads", "1", "--head-dim", "16",
                       "--text-len", "16", "--image-size", "4", "--repeats", "2", "--warmup", "1",
                       "--out", str(tmp_path)])
    assert {(r["mode"], r["provider"]) for r in rows} == {(m, p) for m in ("fwd", "fwdbwd")
                                                          for p in ("dalle_fast", "sdpa_mask")}
    notes = json.loads((tmp_path / "attention_cpu.json").read_text())["meta"]["notes"]
    for mode in ("fwd", "fwdbwd"):
        assert f"sdpa_causal row {mode}: failed (RuntimeError: no kernel image for this GPU)" in notes, notes


def test_speed_targets_unchecked_when_a_baseline_is_missing():
    """A target is never "met" when one of the providers it compares was asked for but failed or was
    skipped, or has no kernel-only time for a kernel-only target: the missing Flex block size may be
    the fastest one (the one to beat), and a missing dalle_fast row is reported as unchecked rather
    than silently dropped."""
    bench = _bench_attention()

    rows = bench.summarize([
        row("row", "fwd", "dalle_fast", 0.05, 320.0, 0.05, 320.0), row("row", "fwd", "flex128", 0.1, 0, 0.1),
        row("row", "fwd", "sdpa_causal", 0.2, 0, 0.2), row("row", "bwd", "flex128", 0.3, 0, 0.3),
        row("col", "fwd", "dalle_fast", 0.05, 320.0, 0.05, 320.0), row("col", "fwd", "flex128", 0.1, 0, 0.1),
        row("col", "fwd", "flex64", 0.09, 0, 0.09), row("col", "fwd", "sdpa_causal", 0.2),  # no kernel time
    ])
    missing = {("row", "fwd", "flex64"), ("row", "bwd", "dalle_fast")}  # flex64 failed, dalle_fast bwd too
    got = {(g["target"], g["kind"]): g for g in bench.targets(rows, missing)}
    flex = got[("forward vs compiled FlexAttention, kernel-only (x faster)", "row")]
    assert flex["value"] == pytest.approx(2.0) and flex["met"] is None and flex["missing"] == ["flex64"]
    bwd = got[("backward vs compiled FlexAttention, kernel-only (x faster)", "row")]
    assert bwd["value"] is None and bwd["met"] is None and bwd["missing"] == ["dalle_fast"]
    assert got[("forward vs SDPA is_causal=True, kernel-only (x faster)", "row")]["met"] is True  # nothing missing
    assert got[("forward vs compiled FlexAttention, kernel-only (x faster)", "col")]["met"] is True  # 0.09 / 0.05
    no_kernel = got[("forward vs SDPA is_causal=True, kernel-only (x faster)", "col")]
    assert no_kernel["met"] is None and no_kernel["missing"] == ["sdpa_causal kernel time"]
    assert got[("forward vs compiled FlexAttention, through the op (x faster)", "col")]["met"] is True
    assert got[("col time / row time (fwd), kernel-only", "col")]["met"] is True
    assert got[("col time / row time (bwd), kernel-only", "col")]["met"] is None
    assert not any(g["met"] for g in got.values() if g["missing"])
    assert bench.target_line(flex).endswith("2.00 >= 1.5   unchecked (flex64 not measured)")
    assert bench.target_line(bwd).endswith("- >= 1.3   unchecked (dalle_fast not measured)")
    assert bench.target_line(got[("forward vs SDPA is_causal=True, kernel-only (x faster)", "row")]).endswith(" met")


def test_cuda_peak_memory_is_the_timed_calls_own(monkeypatch):
    """On CUDA each case's peak memory counts what its timed calls allocate above what was already
    allocated (the other cases' inputs and retained graphs) and leaves out its warmup, where
    dalle_fast tunes its backward (do_bench's 256 MB cache-flush buffer) and Flex compiles. A fake
    allocator stands in for torch.cuda on this CPU."""
    bench = _bench_attention()
    mib = 2**20

    class Mem:
        allocated = peak = 500 * mib  # every case's inputs, prepared before any is timed

        @classmethod
        def call(cls, transient, first_extra, state):
            extra = first_extra if not state else 0  # first call: tuning / compile buffers
            state.append(1)
            cls.peak = max(cls.peak, cls.allocated + transient + extra)

    class Event:
        def __init__(self, enable_timing=False):
            self.t = 0.0

        def record(self):
            import time
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    def reset():
        Mem.peak = Mem.allocated

    for name, fn in dict(synchronize=lambda: None, Event=Event, reset_peak_memory_stats=reset,
                         memory_allocated=lambda: Mem.allocated, max_memory_allocated=lambda: Mem.peak).items():
        monkeypatch.setattr(torch.cuda, name, fn)
    sa, sb = [], []
    cases = {"dalle_fast": (lambda: Mem.call(10 * mib, 300 * mib, sa), 1),
             "sdpa_mask": (lambda: Mem.call(20 * mib, 0, sb), 1)}
    res = bench.time_cases(cases, "cuda", 2, 3)
    assert res["dalle_fast"][1] == pytest.approx(10) and res["sdpa_mask"][1] == pytest.approx(20), res


def test_attention_bench_cuda_defaults_run_every_target_mode():
    """``python bench/attention.py --device cuda`` without --modes runs the modes the GPU speed
    targets are stated for (backward alone: "backward at least 1.3x faster than FlexAttention"), so the
    documented invocation checks every target; the CPU default stays forward and forward+backward."""
    bench = _bench_attention()
    target_modes = {mode for _, mode, _, _, _ in bench._SPEEDUPS} | {"fwd"}
    assert target_modes <= set(bench.DEFAULT_MODES["cuda"].split(",")) == set(bench.MODES)
    assert bench.DEFAULT_MODES["cpu"] == "fwd,fwdbwd"


def test_flex_counts_the_in_range_part_of_its_blocks():
    """FlexAttention's FLOPs are counted on the in-range part of each non-empty block of its
    BlockMask, as dalle_fast's are on its tiles: at N = 320 (T=64, S=16) the last 128-block holds 64
    positions; counting it whole would give Flex-128 98304 entries per head instead of 69632.
    Brute force over the dense mask."""
    from dalle_fast import Layout

    bench = _bench_attention()
    layout = Layout("row", 64, 16)
    N = layout.seq_len
    dense = layout.dense_mask(N)
    for block in (128, 64, 32):
        _, pairs = bench.make_provider(f"flex{block}", layout, 1, 1, N, 16, torch.float32, "cpu")
        expect = sum(dense[i:i + block, j:j + block].numel() for i in range(0, N, block)
                     for j in range(0, N, block) if dense[i:i + block, j:j + block].any())
        assert pairs == expect, (block, pairs, expect)
    assert expect < N * N  # the count is not the dense one


def _attention_json(path, rows, missing=()):
    path.mkdir(parents=True)
    meta = dict(machine="NVIDIA H100 80GB HBM3", torch="2.x", dtype="torch.bfloat16", batch=8, heads=16, head_dim=64,
                missing=[list(m) for m in missing])
    (path / "attention_cuda.json").write_text(json.dumps(dict(meta=meta, rows=rows)))


def test_gpu_decide_table(tmp_path):
    """bench/gpu_decide.py, the GPU check's deciding table, from files as the check's steps write them
    (made up here, no GPU): kernel-only us of both Triton paths per kind and mode against SDPA causal
    and the fastest Flex (from another step's file), equal work on the causal mask, the backward
    split, the targets of each path, L2 bandwidth, ncu's metrics labelled with the launch order."""
    def r(kind, mode, provider, kernel_ms, ms=1.0, rate=None, split=None):
        return dict(row(kind, mode, provider, ms, 1.0, kernel_ms, rate), kernel_split=split)

    _attention_json(tmp_path / "decide_kernels", [
        r("row", "fwd", "dalle_fast[portable]", 0.075, rate=188.0), r("row", "fwd", "dalle_fast[hopper]", 0.035, rate=310.0),
        r("row", "fwd", "sdpa_causal", 0.0847),
        r("row", "bwd", "dalle_fast[portable]", 0.3, split={"_attn_bwd_dkdv": 200.0, "_attn_bwd_dq": 100.0}),
        r("row", "bwd", "dalle_fast[hopper]", 0.2, split={"_bwd_fused": 190.0, "_bwd_delta": 10.0}),
        r("full", "fwd", "dalle_fast[portable]", 0.12, rate=232.0), r("full", "fwd", "dalle_fast[hopper]", 0.04, rate=400.0),
        r("full", "fwd", "sdpa_causal", 0.085),
    ], missing=[("col", "fwd", "dalle_fast[hopper]")])
    _attention_json(tmp_path / "decide_baselines", [
        r("row", "fwd", "flex128", 0.09), r("row", "fwd", "flex64", 0.07), r("row", "bwd", "flex128", 0.4),
        r("full", "fwd", "flex128", 0.1),
    ])
    (tmp_path / "l2_bandwidth.json").write_text(json.dumps(dict(l2_cache_mib=50.0, rows=[
        dict(size_mb=8.0, method="triton read", gbps=5800.0), dict(size_mb=8.0, method="torch.sum", gbps=900.0),
        dict(size_mb=32.0, method="triton read", gbps=6100.0), dict(size_mb=1024.0, method="triton read", gbps=3200.0)])))
    head = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",' \
           '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'

    def metric(i, kernel, name, unit, value):
        return f'"{i}","99","python","h","{kernel}","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0","S","{name}","{unit}","{value}"'
    (tmp_path / "ncu_forward.csv").write_text("\n".join([
        "==PROF== Connected to process 99", head, metric(0, "_fwd_hopper", "Duration", "us", "35.10"),
        metric(0, "_fwd_hopper", "Compute (SM) Throughput", "%", "71.2"), metric(0, "_fwd_hopper", "SM Frequency", "Ghz", "1.7"),
        metric(1, "_attn_fwd", "Duration", "us", "75.00"), metric(1, "_attn_fwd", "Registers Per Thread", "register/thread", "168"),
        "==PROF== Disconnected from process 99"]))
    (tmp_path / "ncu_forward.json").write_text(json.dumps(dict(launches=[dict(path="hopper", kind="row"),
                                                                         dict(path="portable", kind="row")])))
    out = _run("gpu_decide.py", "--dir", str(tmp_path))
    lines = out.splitlines()
    table = {tuple(ln.split()[:2]): ln.split() for ln in lines if ln.startswith(("row ", "full "))}
    # kind mode portable hopper new/old sdpa_causal flex(us name) new-vs-sdpa new-vs-flex old-vs-sdpa old-vs-flex
    assert table[("row", "fwd")] == ["row", "fwd", "75.0", "35.0", "0.47x", "84.7", "70.0", "flex64", "2.42x", "2.00x",
                                     "1.13x", "0.93x"], out
    assert table[("row", "bwd")][2:5] == ["300.0", "200.0", "0.67x"] and table[("row", "bwd")][6:8] == ["400.0", "flex128"]
    assert table[("full", "fwd")][8] == "2.12x"
    assert "# equal work (full = causal mask, as SDPA is_causal=True) fwd: hopper 2.12x, portable 0.71x SDPA's speed" in out
    assert "# bwd split dalle_fast[hopper] row (us): _bwd_fused 190.0, _bwd_delta 10.0" in out
    assert "# L2 read bandwidth: 6.10 TB/s from L2 (triton read, 32 MB buffer); 3.20 TB/s from HBM (1024 MB)" in out
    assert "# ncu hopper row _fwd_hopper: Duration 35.10 us, Compute (SM) Throughput 71.2 %" in out
    assert "# ncu portable row _attn_fwd: Duration 75.00 us, Registers Per Thread 168 register/thread" in out
    hopper = lines[lines.index("# targets of dalle_fast[hopper] (value met / NOT / ? unchecked)") + 1:]
    assert hopper[0].split() == ["target", "goal", "row", "col", "full"]
    flex_line = next(ln for ln in hopper if ln.startswith("fwd vs Flex, kernel"))
    # row 0.07 / 0.035, col unchecked (hopper's col forward was asked for, not measured), full 0.1 / 0.04
    assert flex_line.split()[-6:] == ["2.00", "met", "-", "?", "2.50", "met"], flex_line
    tflops = next(ln for ln in hopper if ln.startswith("fwd TFLOP/s, kernel"))
    assert tflops.split()[-6:] == ["310.00", "met", "-", "?", "400.00", "met"], tflops  # col: hopper fwd missing
    decide = json.loads((tmp_path / "decide.json").read_text())
    assert len(decide["inputs"]) == 2 and [k["kernel"] for k in decide["ncu"]] == ["_fwd_hopper", "_attn_fwd"]
    assert decide["kernel_only"][0] == dict(kind="row", mode="fwd", old_us=75.0, new_us=35.0, new_over_old=0.467,
                                            sdpa_causal_us=84.7, flex_us=70.0, flex="flex64", new_vs_sdpa=2.42,
                                            new_vs_flex=2.0, old_vs_sdpa=1.129, old_vs_flex=0.933, profiler=False)
    assert decide["missing"] == [["col", "fwd", "dalle_fast[hopper]"]]
    # ncu without permission for the counters: a note, no metrics
    (tmp_path / "ncu_forward.csv").write_text("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission\n")
    out = _run("gpu_decide.py", "--dir", str(tmp_path))
    assert "# ncu speed-of-light: ncu: no permission to read the GPU's performance counters (ERR_NVGPUCTRPERM)" in out


def test_adapter_sweep_times_both_sides_per_configuration(tmp_path):
    """bench/adapter_sweep.py --quick: one row per configuration with both sides timed and the
    ratio theirs / ours, in the table it prints and in its JSON."""
    import dalle_fast.integrations.dalle_pytorch as dfp
    try:
        dfp.import_dalle_pytorch(stand_ins=True)
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"dalle-pytorch cannot be imported ({e})")
    out = _run("adapter_sweep.py", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "adapter_sweep.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"quick-mix-4x4", "quick-full-cfg3-4x4"} and "DALLE-pytorch 1.6.6" in out
    for name, r in rows.items():
        assert r["dalle_pytorch_s"] > 0 and r["adapter_s"] > 0
        assert r["ratio"] == pytest.approx(r["dalle_pytorch_s"] / r["adapter_s"])
        assert f"{r['ratio']:.1f}x" in next(line for line in out.splitlines() if line.startswith(name))
    assert rows["quick-full-cfg3-4x4"]["cond_scale"] == 3.0 and rows["quick-mix-4x4"]["image_tokens"] == "4x4"

