"""Static resources of the CUDA C++ kernels (csrc/cuda/*.cu) on Hopper, without a GPU.

Compiles each CUDA source for sm_90a with nvcc and the extension's flags (setup.py) and reads
ptxas's report per kernel: registers per thread, spill stores / loads, stack frame and shared
memory. A kernel that spills, or needs more registers than its launch bounds allow, is slow on any
Hopper card; this is the check that needs no GPU (time needs one: bench/decode.py, bench/sampling.py).

    python bench/cuda_resources.py                 # every source, table to stdout
    python bench/cuda_resources.py --sources decode_attention --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
#: nvcc flags of the extension's CUDA sources (setup.py), for sm_90a
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-arch=sm_90a"]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, .*?(\d+) bytes smem)?")


def parse_ptxas(text: str) -> list:
    """ptxas -v output -> one dict per entry function: kernel (mangled), arch, registers, spill_stores,
    spill_loads, stack, smem (bytes of static shared memory)."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = dict(kernel=m.group(1), arch=m.group(2), registers=None, spill_stores=0, spill_loads=0, stack=0,
                       smem=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m and cur["registers"] is None:
            cur.update(registers=int(m.group(1)), smem=int(m.group(3) or 0))
    return rows


def demangle(names: list) -> list:
    """Readable kernel names (c++filt, when present), the anonymous namespace and parameter list dropped."""
    tool = shutil.which("c++filt")
    out = names
    if tool and names:
        r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
        if r.returncode == 0 and len(r.stdout.splitlines()) == len(names):
            out = r.stdout.splitlines()
    return [re.sub(r"\(.*\)$", "", re.sub(r"\(anonymous namespace\)::|dalle_fast::cuda::", "", n)) for n in out]


def compile_source(nvcc: str, source: Path) -> list:
    """Kernel rows of one .cu file (RuntimeError with nvcc's output when it fails)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *NVCC_FLAGS, "-Xptxas", "-v", "-I", str(ROOT / "csrc"), "-cubin", "-o",
               os.path.join(tmp, "k.cubin"), str(source)]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name}:\n{r.stderr[-3000:]}")
    rows = parse_ptxas(r.stderr + r.stdout)
    for row, name in zip(rows, demangle([row["kernel"] for row in rows])):
        row.update(source=source.name, name=name)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default=None,
                   help="comma-separated stems of csrc/cuda/*.cu (default: all)")
    p.add_argument("--nvcc", default=None, help="nvcc to use (default: $CUDA_HOME/bin/nvcc, else PATH)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    available = sorted(f.stem for f in CUDA_DIR.glob("*.cu"))
    stems = available if args.sources is None else [s for s in args.sources.split(",") if s]
    unknown = [s for s in stems if s not in available]
    if unknown or not stems:
        p.error(f"--sources: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(available)}")
    home = os.environ.get("CUDA_HOME")
    nvcc = args.nvcc or (str(Path(home) / "bin" / "nvcc") if home and (Path(home) / "bin" / "nvcc").exists()
                         else shutil.which("nvcc"))
    if not nvcc:
        p.error("--nvcc: no nvcc found (set CUDA_HOME or put nvcc on PATH)")
    rows = [row for s in stems for row in compile_source(nvcc, CUDA_DIR / f"{s}.cu")]
    cols = ["source", "name", "registers", "spill_stores", "spill_loads", "stack", "smem"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    spilling = [r["name"] for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"# {len(rows)} kernels for sm_90a; spilling: {', '.join(spilling) if spilling else 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
