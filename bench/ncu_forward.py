"""dalle_fast's Triton forward, once per (Triton path, kind), inside a CUDA profiler range: the
program Nsight Compute profiles for the forward kernels' speed-of-light.

Every problem runs (compiles, and tunes unless the tuning cache already holds it) before the range
opens, so with ``ncu --profile-from-start off`` the range holds one forward per (path, kind), in the
order written to ``--out``. A path this dalle_fast or GPU does not have is left out with a note.

    ncu --profile-from-start off --section SpeedOfLight --csv --page details \\
        python bench/ncu_forward.py --out bench/out/ncu_forward.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
try:
    import dalle_fast
except ImportError:
    sys.path.insert(0, str(ROOT))
    import dalle_fast  # noqa: E402
from dalle_fast.ops import TRITON_HEAD_DIMS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import check_at_least, check_cuda, comma_list  # noqa: E402
from attention import Skip, TRITON_PATHS, path_context  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--paths", default="hopper,portable", help=f"comma list of {', '.join(TRITON_PATHS)}")
    p.add_argument("--kinds", default="row,col,conv,full")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64, choices=TRITON_HEAD_DIMS)
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--out", default=None, help="JSON file: the (path, kind) of each profiled launch, in order")
    args = p.parse_args(argv)
    paths = comma_list(p, "--paths", args.paths, TRITON_PATHS)
    kinds = comma_list(p, "--kinds", args.kinds, dalle_fast.KINDS)
    check_at_least(p, args, 1, "--batch", "--heads", "--text-len", "--image-size")
    check_cuda(p, args.device)

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    problems, notes = [], []
    for path in paths:
        try:
            context = path_context(f"dalle_fast[{path}]")
        except Skip as e:
            notes.append(f"{path}: skipped ({e})")
            continue
        for kind in kinds:
            layout = dalle_fast.Layout(kind, args.text_len, args.image_size)
            q, k, v = (torch.randn(args.batch, args.heads, layout.seq_len, args.head_dim, generator=gen)
                       .to("cuda", dtype) for _ in range(3))
            try:
                with context(), torch.no_grad():
                    dalle_fast.sparse_attention(q, k, v, layout, backend="triton")  # compile, tune
            except ValueError as e:
                notes.append(f"{path} {kind}: skipped ({e})")
                continue
            problems.append((path, kind, context, layout, q, k, v))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _, _, context, layout, q, k, v in problems:
        with context(), torch.no_grad():
            dalle_fast.sparse_attention(q, k, v, layout, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    launches = [dict(path=path, kind=kind) for path, kind, *_ in problems]
    for n in notes:
        print(f"# {n}")
    print(f"# profiled range: {', '.join(f'{x[0]} {x[1]}' for x in problems) or 'nothing'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(launches=launches, notes=notes), indent=1))
    if not problems:
        raise SystemExit("no forward to profile: " + "; ".join(notes))


if __name__ == "__main__":
    main()
