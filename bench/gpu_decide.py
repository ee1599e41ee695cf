"""The GPU check's deciding table, from what its steps wrote: no GPU needed.

Per kind and mode, the kernel-only time of dalle_fast's two Triton paths (portable: the kernels that
run on any GPU; hopper: the sm_90 kernels) against SDPA ``is_causal=True`` and the fastest compiled
FlexAttention; on the plain causal mask (kind ``full``) dalle_fast does SDPA's work, so that row
is the cost of the kernel structure at equal work. Then each path's backward split per kernel, the
speed targets (kernel-only and through the op), the L2 read bandwidth and Nsight Compute's
speed-of-light of the forward kernels. Anything a step did not measure is shown as "-".

Reads, under ``--dir`` (the check's output folder):
    decide_kernels/attention_cuda.json    bench/attention.py: dalle_fast per path + SDPA causal
    decide_baselines/attention_cuda.json  bench/attention.py: FlexAttention, SDPA + mask, ...
    attention/attention_cuda.json         bench/attention.py: forward + backward through the op
    l2_bandwidth.json                     bench/l2_bandwidth.py
    ncu_forward.csv, ncu_forward.json     ncu --csv --page details on bench/ncu_forward.py
and writes ``decide.json`` there; prints the table.

    python bench/gpu_decide.py --dir bench/out
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ATTENTION_FILES = ("decide_kernels/attention_cuda.json", "decide_baselines/attention_cuda.json",
                   "attention/attention_cuda.json")
OLD, NEW = "dalle_fast[portable]", "dalle_fast[hopper]"
FLEX = ("flex128", "flex64", "flex32")
KINDS = ("row", "col", "conv", "full")
#: ncu metrics shown per kernel (SpeedOfLight and LaunchStats sections)
NCU_METRICS = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "L2 Cache Throughput",
               "DRAM Throughput", "Registers Per Thread", "Waves Per SM")
#: short names of bench/attention.py's target labels
_TARGETS = (
    ("forward vs compiled FlexAttention, kernel-only (x faster)", "fwd vs Flex, kernel"),
    ("forward vs SDPA is_causal=True, kernel-only (x faster)", "fwd vs SDPA causal, kernel"),
    ("backward vs compiled FlexAttention, kernel-only (x faster)", "bwd vs Flex, kernel"),
    ("forward TFLOP/s on the computed tiles, kernel-only", "fwd TFLOP/s, kernel"),
    ("forward vs compiled FlexAttention, through the op (x faster)", "fwd vs Flex, op"),
    ("fwd+bwd vs compiled FlexAttention, through the op (x faster)", "fwd+bwd vs Flex, op"),
    ("col time / row time (fwd), kernel-only", "col / row fwd, kernel"),
    ("col time / row time (bwd), kernel-only", "col / row bwd, kernel"),
)


def load_attention(paths):
    """Rows of the attention JSONs that exist (the first file's row wins for a repeated (kind, mode,
    provider)), the (kind, mode, provider) they asked for but did not measure, their meta and the
    files read."""
    rows, missing, meta, read = {}, set(), {}, []
    for path in paths:
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        read.append(str(path))
        meta = meta or data.get("meta", {})
        for r in data.get("rows", []):
            rows.setdefault((r["kind"], r["mode"], r["provider"]), r)
        missing |= {tuple(m) for m in data.get("meta", {}).get("missing", [])}
    missing -= set(rows)  # measured by another step
    return list(rows.values()), missing, meta, read


def _kernel(r):
    return r.get("kernel_ms") if r else None


def decide_rows(rows) -> list:
    """Per (kind, mode): kernel-only us of each path, SDPA causal and the fastest Flex, and the
    ratios (x faster: the other's time over the path's)."""
    by = {(r["kind"], r["mode"], r["provider"]): r for r in rows}
    out = []
    keys = list(dict.fromkeys((r["kind"], r["mode"]) for r in rows if r["mode"] in ("fwd", "bwd")))
    keys.sort(key=lambda km: (KINDS.index(km[0]) if km[0] in KINDS else len(KINDS), km[1] != "fwd"))
    for kind, mode in keys:
        old = _kernel(by.get((kind, mode, OLD)) or by.get((kind, mode, "dalle_fast")))
        new = _kernel(by.get((kind, mode, NEW)))
        sdpa = _kernel(by.get((kind, mode, "sdpa_causal")))
        flex = [(by[(kind, mode, f)]["kernel_ms"], f) for f in FLEX if _kernel(by.get((kind, mode, f)))]
        flex_ms, flex_name = min(flex) if flex else (None, None)
        methods = {r["kernel_method"] for (k, m, _), r in by.items() if (k, m) == (kind, mode) and r.get("kernel_method")}

        def x(a, b):
            return round(a / b, 3) if a and b else None

        out.append(dict(kind=kind, mode=mode, old_us=_us(old), new_us=_us(new), new_over_old=x(new, old),
                        sdpa_causal_us=_us(sdpa), flex_us=_us(flex_ms), flex=flex_name,
                        new_vs_sdpa=x(sdpa, new), new_vs_flex=x(flex_ms, new), old_vs_sdpa=x(sdpa, old),
                        old_vs_flex=x(flex_ms, old), profiler="profiler" in methods))
    return out


def _us(ms):
    return round(ms * 1e3, 2) if ms else None


def load_l2(path: Path):
    """(summary line, rows) of bench/l2_bandwidth.py's JSON, or (None, []) without it."""
    if not path.is_file():
        return None, []
    data = json.loads(path.read_text())
    rows = [r for r in data.get("rows", []) if r.get("method") == "triton read"] or data.get("rows", [])
    if not rows:
        return None, []
    l2 = data.get("l2_cache_mib")
    resident = [r for r in rows if l2 and r["size_mb"] < l2 * 1.048576] or rows[:-1] or rows
    best = max(resident, key=lambda r: r["gbps"])
    big = max(rows, key=lambda r: r["size_mb"])
    line = f"{best['gbps'] / 1e3:.2f} TB/s from L2 ({best['method']}, {best['size_mb']:g} MB buffer)"
    if big is not best and big not in resident:
        line += f"; {big['gbps'] / 1e3:.2f} TB/s from HBM ({big['size_mb']:g} MB)"
    return line, data.get("rows", [])


def load_ncu(csv_path: Path, launches_path: Path):
    """Kernels Nsight Compute profiled, in launch order, each with the (path, kind) bench/ncu_forward.py
    launched at that place and the metrics of NCU_METRICS; and a note when ncu could not profile
    (no permission for the GPU's performance counters)."""
    if not csv_path.is_file():
        return [], None
    text = csv_path.read_text(errors="replace")
    if "ERR_NVGPUCTRPERM" in text:
        return [], "ncu: no permission to read the GPU's performance counters (ERR_NVGPUCTRPERM)"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return [], "ncu: no results in " + csv_path.name
    kernels = {}
    for r in csv.DictReader(io.StringIO("\n".join(ln for ln in lines[start:] if not ln.startswith("=="))),
                            skipinitialspace=True):
        k = kernels.setdefault(r["ID"], dict(kernel=r["Kernel Name"], metrics={}))
        if r.get("Metric Name") in NCU_METRICS:
            k["metrics"][r["Metric Name"]] = f"{r['Metric Value']} {r.get('Metric Unit') or ''}".strip()
    launches = json.loads(launches_path.read_text()).get("launches", []) if launches_path.is_file() else []
    out = []
    for i, key in enumerate(sorted(kernels, key=lambda s: int(s) if s.isdigit() else s)):
        where = launches[i] if i < len(launches) else {}
        out.append(dict(path=where.get("path"), kind=where.get("kind"), **kernels[key]))
    return out, None


def targets_of(rows, missing):
    """bench/attention.py's speed targets on the merged rows (None where it cannot be imported)."""
    sys.path.insert(0, str(BENCH))
    try:
        import attention
    except Exception as e:  # noqa: BLE001 - the table is still useful without the targets
        return None, f"targets not checked: bench/attention.py does not import ({type(e).__name__}: {e})"
    return attention.targets(attention.summarize(rows), missing), None


def _cell(v, fmt=".1f"):
    return format(v, fmt) if v is not None else "-"


def _x(v):
    return f"{v:.2f}x" if v is not None else "-"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="the GPU check's output folder ($OUT)")
    p.add_argument("--out", default=None, help="JSON file to write (default: <dir>/decide.json)")
    args = p.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        p.error(f"--dir {args.dir}: not a directory")
    rows, missing, meta, read = load_attention([root / f for f in ATTENTION_FILES])
    table = decide_rows(rows)
    l2_line, l2_rows = load_l2(root / "l2_bandwidth.json")
    ncu, ncu_note = load_ncu(root / "ncu_forward.csv", root / "ncu_forward.json")
    goals, goals_note = targets_of(rows, missing) if rows else ([], None)
    splits = [dict(provider=r["provider"], kind=r["kind"], mode=r["mode"], us=r["kernel_split"])
              for r in rows if r.get("kernel_split")]
    notes = [n for n in (goals_note, ncu_note) if n]  # into the JSON; printed where they belong

    print(f"# deciding run: {meta.get('machine', 'no attention results')}"
          + (f", torch {meta['torch']}, {meta['dtype']}, B={meta['batch']} H={meta['heads']} D={meta['head_dim']}"
             if meta else ""))
    print("# kernel-only us per call (CUDA-graph replays; * = some by profiler); x = times faster")
    print(f"{'kind':<6}{'mode':<5}{'portable':>10}{'hopper':>9}{'new/old':>9}{'sdpa_causal':>12}{'flex (best)':>18}"
          f"{'new vs sdpa':>12}{'new vs flex':>12}{'old vs sdpa':>12}{'old vs flex':>12}")
    for r in table:
        flex = f"{_cell(r['flex_us'])} {r['flex'] or ''}".strip()
        print(f"{r['kind']:<6}{r['mode']:<5}{_cell(r['old_us']):>10}{_cell(r['new_us']):>9}{_x(r['new_over_old']):>9}"
              f"{_cell(r['sdpa_causal_us']):>12}{flex:>18}{_x(r['new_vs_sdpa']):>12}{_x(r['new_vs_flex']):>12}"
              f"{_x(r['old_vs_sdpa']):>12}{_x(r['old_vs_flex']):>12}{' *' if r['profiler'] else ''}")
    if not table:
        print("(no kernel-only measurements)")
    for r in table:
        if r["kind"] == "full":
            print(f"# equal work (full = causal mask, as SDPA is_causal=True) {r['mode']}: hopper {_x(r['new_vs_sdpa'])}, "
                  f"portable {_x(r['old_vs_sdpa'])} SDPA's speed")
    for s in splits:
        if s["mode"] == "bwd":
            print(f"# bwd split {s['provider']} {s['kind']} (us): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in s["us"].items()))
    print(f"# L2 read bandwidth: {l2_line or '-'}")
    for k in ncu:
        m = k["metrics"]
        print(f"# ncu {k['path'] or '?'} {k['kind'] or '?'} {k['kernel']}: "
              + ", ".join(f"{name} {m[name]}" for name in NCU_METRICS if name in m))
    if not ncu:
        print(f"# ncu speed-of-light: {ncu_note or '-'}")
    if goals:
        short = dict(_TARGETS)
        for prov in dict.fromkeys(g["provider"] for g in goals):
            print(f"# targets of {prov} (value met / NOT / ? unchecked)")
            cells = {}
            for g in goals:
                if g["provider"] == prov:
                    mark = "?" if g["met"] is None else ("met" if g["met"] else "NOT")
                    cells[(short.get(g["target"], g["target"]), g["goal"], g["kind"])] = f"{_cell(g['value'], '.2f')} {mark}"
            names = list(dict.fromkeys((t, goal) for t, goal, _ in cells))
            kinds = [k for k in KINDS if any(key[2] == k for key in cells)]
            print(f"{'target':<28}{'goal':<9}" + "".join(f"{k:>12}" for k in kinds))
            for t, goal in names:
                print(f"{t:<28}{goal:<9}" + "".join(f"{cells.get((t, goal, k), ''):>12}" for k in kinds))
    if goals_note:
        print(f"# {goals_note}")

    out = Path(args.out) if args.out else root / "decide.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, inputs=read, kernel_only=table, backward_split=splits,
                                   targets=goals or [], l2=dict(summary=l2_line, rows=l2_rows), ncu=ncu,
                                   missing=sorted(list(m) for m in missing), notes=notes), indent=1))
    print(f"# wrote {out}")
    return table


if __name__ == "__main__":
    main()
