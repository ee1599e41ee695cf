"""DALLE-pytorch's own generation against the dalle_fast adapter over a sweep of model configurations.

    python bench/adapter_sweep.py                 # the sweep below, 2 threads, best of 1 after a warm-up
    python bench/adapter_sweep.py --quick         # two tiny configurations (seconds; what the tests run)
    python bench/adapter_sweep.py --only small-vocab-8x8,full-cfg3-16x16

Each configuration is one random-weight ``dalle_pytorch.DALLE`` (seeded), timed with its own
``generate_images(use_cache=True, ...)`` and with ``dalle_fast.integrations.dalle_pytorch.generate``
on the same weights, text and sampling options (the VAE decode is left out of both). The two sides
run in turn after a warm-up each; the best of ``--repeat`` counts. DALLE-pytorch 1.6.6 uses its
cache only where ``cond_scale != 1`` and only in its ``full`` layers: the ``full-cfg3`` rows time it
with the cache working, the others its uncached path. Prints one table (configuration, DALLE-pytorch
seconds, adapter seconds, ratio; with ``--compile`` also the adapter with its compiled decode step,
its compile time excluded: a warm-up call compiles) and writes ``--out``/adapter_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# _util first: it makes the installed dalle_fast importable, else this checkout's
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import check_at_least, machine  # noqa: E402


MIX = ("full", "axial_row", "axial_col", "conv_like")

#: name -> (DALLE kwargs, DiscreteVAE kwargs, batch, cond_scale). image tokens: image_size / 2**num_layers
SWEEP = {
    # per-step overhead: tiny widths and vocabularies, where DALLE-pytorch's cost is its modules' calls
    "small-vocab-8x8": (dict(dim=64, depth=2, heads=4, dim_head=16, text_seq_len=16, num_text_tokens=256,
                             attn_types=MIX), dict(image_size=32, num_layers=2, num_tokens=64), 4, 1.0),
    "small-vocab-16x16": (dict(dim=128, depth=4, heads=4, dim_head=32, text_seq_len=32, num_text_tokens=512,
                               attn_types=MIX), dict(image_size=64, num_layers=2, num_tokens=256), 4, 1.0),
    "small-vocab-full-cfg3-8x8": (dict(dim=64, depth=2, heads=4, dim_head=16, text_seq_len=16, num_text_tokens=256,
                                       attn_types=("full",)), dict(image_size=32, num_layers=2, num_tokens=64), 4,
                                  3.0),
    # the width-256 depth-8 models of DALLE-pytorch's README scale
    "w256-d8-16x16": (dict(dim=256, depth=8, heads=8, dim_head=32, text_seq_len=64, num_text_tokens=10000,
                           attn_types=MIX), dict(image_size=64, num_layers=2, num_tokens=8192), 1, 1.0),
    "full-cfg3-16x16": (dict(dim=256, depth=8, heads=8, dim_head=32, text_seq_len=64, num_text_tokens=10000,
                             attn_types=("full",)), dict(image_size=64, num_layers=2, num_tokens=8192), 4, 3.0),
}
QUICK = {
    "quick-mix-4x4": (dict(dim=32, depth=2, heads=2, dim_head=16, text_seq_len=8, num_text_tokens=64,
                           attn_types=MIX), dict(image_size=16, num_layers=2, num_tokens=32), 2, 1.0),
    "quick-full-cfg3-4x4": (dict(dim=32, depth=1, heads=2, dim_head=16, text_seq_len=8, num_text_tokens=64,
                                 attn_types=("full",)), dict(image_size=16, num_layers=2, num_tokens=32), 2, 3.0),
}


def best_interleaved(fns, repeat: int):
    """Best seconds of each callable, run in turn ``repeat`` times after one warm-up each."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def run_one(dalle_pytorch, dfp, name, spec, repeat, compiled=False):
    model_kw, vae_kw, batch, cond_scale = spec
    torch.manual_seed(0)
    vae = dalle_pytorch.DiscreteVAE(codebook_dim=64, hidden_dim=16, **vae_kw)
    model = dalle_pytorch.DALLE(vae=vae, **model_kw).eval()
    vae.decode = lambda codes: codes  # time the transformer's sampling only, on both sides
    text = torch.randint(1, model_kw["num_text_tokens"], (batch, model_kw["text_seq_len"]))
    sampling = dict(filter_thres=0.9, temperature=1.0, cond_scale=cond_scale)

    def theirs():
        model.generate_images(text.clone(), use_cache=True, **sampling)

    def ours():
        dfp.generate(model, text, seed=0, compile=False, **sampling)

    def ours_compiled():
        dfp.generate(model, text, seed=0, compile=True, **sampling)

    fns = [theirs, ours] + ([ours_compiled] if compiled else [])
    t_theirs, t_ours, *t_comp = best_interleaved(fns, repeat)
    s = model.transformer.image_fmap_size
    row = {"config": name, "dim": model_kw["dim"], "depth": model_kw["depth"], "heads": model_kw["heads"],
           "dim_head": model_kw["dim_head"], "text_seq_len": model_kw["text_seq_len"],
           "num_text_tokens": model_kw["num_text_tokens"], "image_tokens": f"{s}x{s}",
           "image_vocab": vae_kw["num_tokens"], "attn_types": ",".join(model_kw["attn_types"]), "batch": batch,
           "cond_scale": cond_scale, "dalle_pytorch_s": t_theirs, "adapter_s": t_ours, "ratio": t_theirs / t_ours}
    extra = ""
    if compiled:
        row.update(adapter_compiled_s=t_comp[0], ratio_compiled=t_theirs / t_comp[0])
        extra = f" {t_comp[0]:8.2f} s {t_theirs / t_comp[0]:7.1f}x"
    print(f"{name:28s} {t_theirs:9.2f} s {t_ours:8.2f} s {t_theirs / t_ours:7.1f}x{extra}", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two tiny configurations instead of the sweep")
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument("--repeat", type=int, default=1, help="timings per side after the warm-up; the best counts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time the adapter with compile=True")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="directory (default: bench/out)")
    args = p.parse_args(argv)
    check_at_least(p, args, 1, "--repeat", "--threads")
    sweep = QUICK if args.quick else SWEEP
    if args.only is not None:
        names = [n for n in args.only.split(",") if n]
        unknown = [n for n in names if n not in SWEEP and n not in QUICK]
        if unknown or not names:
            p.error(f"--only: unknown configuration(s) {unknown or args.only!r}; known: "
                    f"{', '.join(list(SWEEP) + list(QUICK))}")
        sweep = {n: {**SWEEP, **QUICK}[n] for n in names}
    torch.set_num_threads(args.threads)
    import dalle_fast.integrations.dalle_pytorch as dfp
    dalle_pytorch = dfp.import_dalle_pytorch(stand_ins=True)
    print(f"# {machine('cpu')}; DALLE-pytorch {dalle_pytorch.__version__}; best of {args.repeat} after a warm-up")
    print(f"{'configuration':28s} {'DALLE-pytorch':>11s} {'adapter':>10s} {'ratio':>8s}"
          + (f" {'compiled':>10s} {'ratio':>8s}" if args.compile else ""))
    rows = [run_one(dalle_pytorch, dfp, name, spec, args.repeat, args.compile) for name, spec in sweep.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_sweep.json").write_text(json.dumps(
        {"machine": machine("cpu"), "dalle_pytorch": dalle_pytorch.__version__, "repeat": args.repeat, "threads": args.threads,
         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
