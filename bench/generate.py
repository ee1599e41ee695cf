"""Generation benchmark: images/s and tokens/s of dalle_fast's KV-cached sparse generation against
(a) the same model with a dense static cache (text copied per row, masked dense attention over the
prefix: the common fast baseline) and (b) recomputing the prefix every step (no cache).

    python bench/generate.py                        # CPU, small preset (text 256 + 32x32), 1 x 16
    python bench/generate.py --quick               # tiny preset, full runs, seconds
    python bench/generate.py --device cuda --full  # GPU (CUDA graph for dalle_fast)
    python bench/generate.py --peer dalle_pytorch  # DALLE-pytorch generate_images vs the adapter (batch 4)
    python bench/generate.py --compile             # also the sparse path with its decode step compiled

dalle_fast and the dense baseline are timed on complete generations (a warm-up run, then the best
of ``--repeat``). A complete no-cache run of the small preset on CPU takes about an hour, so unless
``--full`` is given it is timed on ``--sample-steps`` steps at positions spread evenly over the
image (a step's cost depends only on its position) and the whole generation is estimated as the
first step + (S*S - 1) x the mean step; the output marks such numbers as estimates. Results go to
``--out`` (generate.json, generate.csv) with the machine and versions.

``--peer dalle_pytorch`` compares against DALLE-pytorch itself (needs requirements-dalle-pytorch.txt):
one random-weight ``dalle_pytorch.DALLE`` (default: dim 256, depth 8, heads 8, dim_head 32,
text_seq_len 64, 16x16 image tokens, attn_types full/axial_row/axial_col/conv_like; ``--quick``: a
tiny one) is timed with its own ``generate_images(use_cache=True)`` and with
``dalle_fast.integrations.dalle_pytorch.generate`` (same weights, same sampling options; the VAE
decode is left out of both), and one training step (forward + backward of the loss) unpatched and
patched. Runs of the two sides alternate, the best of ``--repeat`` counts. Note that DALLE-pytorch
1.6.6 hands its cache to the layers only when ``cond_scale != 1`` (``forward_with_cond_scale`` drops
it otherwise), so ``--cfg-scale 1`` times its uncached path whatever ``use_cache`` says.

``--no-graph`` (CUDA) adds mode ``nograph``: dalle_fast's sparse path with ``cuda_graph=False``
(every step launched from Python) next to ``sparse`` (the step captured once and replayed).

``--compile`` (CPU) adds dalle_fast with its decode step compiled by ``torch.compile``
(``compile=True``; the other dalle_fast rows run ``compile=False``): mode ``compiled`` next to
``sparse``, or a compiled adapter next to the eager one with ``--peer``. Its first call compiles
the step; that call's time less a compiled generation's is printed as the compile time (shorter
when torch's on-disk compile cache already holds the graph, ``$TORCHINDUCTOR_CACHE_DIR``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# _util first: it makes the installed dalle_fast importable, else this checkout's
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import check_at_least, check_cuda, check_finite, comma_list  # noqa: E402

from dalle_fast import sample  # noqa: E402
from dalle_fast.generate import ATTENTION_MODES, generate_codes  # noqa: E402
from dalle_fast.models.dalle import DALLE, DALLEConfig  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_uncached_sampled(model, text, n, cfg_scale, device, steps, repeat):
    """Estimate one complete no-cache generation from ``steps`` steps at evenly spread positions
    (the step feeding position ``p`` recomputes positions ``0..p``; its cost depends only on ``p``).
    Returns (estimated seconds, first-step seconds, mean step seconds)."""
    cfg = model.config
    T, S2 = cfg.text_len, cfg.image_tokens
    rows = text.shape[0] * n
    seeds = torch.arange(rows, device=device)
    text_rows = text.repeat_interleave(n, 0)
    if cfg_scale != 1.0:
        text_rows = torch.cat([text_rows, model.null_text(rows)])
    codes = torch.zeros(text_rows.shape[0], S2, dtype=torch.long, device=device)

    def timed(p):
        best = float("inf")
        for _ in range(repeat):
            _sync(device)
            t = time.perf_counter()
            h = model.hidden(model.embed(text_rows, codes[:, :p - T + 1]))
            logits = model.image_logits(h[:, -1])  # then one draw per row, as generation makes it
            sample(logits[:rows], seeds=seeds, step=0, uncond_logits=logits[rows:] if cfg_scale != 1.0 else None,
                   cfg_scale=cfg_scale, return_error_flag=True)
            _sync(device)
            best = min(best, time.perf_counter() - t)
        return best

    first = timed(T - 1)
    positions = torch.linspace(T, T + S2 - 2, steps).round().long().tolist()
    step = sum(timed(p) for p in positions) / len(positions)
    return first + step * (S2 - 1), first, step


def machine(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _best_interleaved(fns, repeat, device):
    """Best seconds of each callable, the callables run in turn ``repeat`` times (after one warm-up each)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def _first_call(fn, device) -> float:
    """Seconds of one call of ``fn`` (the first, which compiles)."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def peer_dalle_pytorch(args, device) -> dict:
    """DALLE-pytorch's generate_images(use_cache=True) and training step vs the dalle_fast adapter."""
    import dalle_fast.integrations.dalle_pytorch as dfp
    dalle_pytorch = dfp.import_dalle_pytorch(stand_ins=True)
    if args.quick:
        cfg = dict(dim=64, depth=4, heads=4, dim_head=16, text_seq_len=16, image_size=32, num_layers=2,
                   num_tokens=256)  # 8x8 tokens
    else:
        cfg = dict(dim=256, depth=8, heads=8, dim_head=32, text_seq_len=64, image_size=64, num_layers=2,
                   num_tokens=8192)  # 16x16 tokens
    torch.manual_seed(0)
    vae = dalle_pytorch.DiscreteVAE(image_size=cfg["image_size"], num_layers=cfg["num_layers"],
                                    num_tokens=cfg["num_tokens"], codebook_dim=64, hidden_dim=16)
    model = dalle_pytorch.DALLE(dim=cfg["dim"], vae=vae, num_text_tokens=10000, text_seq_len=cfg["text_seq_len"],
                                depth=cfg["depth"], heads=cfg["heads"], dim_head=cfg["dim_head"],
                                attn_types=("full", "axial_row", "axial_col", "conv_like")).to(device)
    vae.decode = lambda codes: codes  # time the transformer's sampling only, on both sides
    b = args.batch
    text = torch.randint(1, 10000, (b, cfg["text_seq_len"]), device=device)
    image = torch.randint(0, cfg["num_tokens"], (b, model.image_seq_len), device=device)
    sampling = dict(filter_thres=0.9, temperature=1.0, cond_scale=args.cfg_scale)
    s = model.transformer.image_fmap_size
    print(f"# peer dalle_pytorch {dalle_pytorch.__version__}: dim {cfg['dim']}, depth {cfg['depth']}, heads "
          f"{cfg['heads']}, dim_head {cfg['dim_head']}, text_seq_len {cfg['text_seq_len']}, {s}x{s} image tokens, "
          f"batch {b}, cond_scale {args.cfg_scale}, {device}, {torch.get_num_threads()} threads")

    def theirs():
        model.generate_images(text.clone(), use_cache=True, **sampling)

    def ours():
        dfp.generate(model, text, compile=False, **sampling)

    def ours_compiled():
        dfp.generate(model, text, compile=True, **sampling)

    compile_s = None
    if args.compile:
        compile_s = _first_call(ours_compiled, device)
        gen_theirs, gen_ours, gen_compiled = _best_interleaved([theirs, ours, ours_compiled], args.repeat, device)
        compile_s -= gen_compiled
    else:
        (gen_theirs, gen_ours), gen_compiled = _best_interleaved([theirs, ours], args.repeat, device), None
    print(f"generate: DALLE-pytorch generate_images(use_cache=True) {gen_theirs:8.2f} s, "
          f"dalle_fast {gen_ours:6.2f} s: {gen_theirs / gen_ours:.1f}x")
    if gen_compiled is not None:
        print(f"generate: dalle_fast compiled step {gen_compiled:6.2f} s: {gen_theirs / gen_compiled:.1f}x "
              f"DALLE-pytorch, {gen_ours / gen_compiled:.2f}x the eager step (compile {compile_s:.1f} s)")

    model.train()
    patched = dfp.patch(__import__("copy").deepcopy(model))

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(text, image, return_loss=True).backward()
        return run

    train_theirs, train_ours = _best_interleaved([step(model), step(patched)], max(args.repeat, 3), device)
    print(f"train step (forward + backward): DALLE-pytorch {train_theirs * 1e3:8.1f} ms, patched "
          f"{train_ours * 1e3:8.1f} ms: {train_theirs / train_ours:.2f}x")

    # the attention modules alone (what patch replaces), forward + backward on the training shapes
    x = torch.randn(b, model.total_seq_len, cfg["dim"], device=device, requires_grad=True)
    freqs = model.transformer.pos_emb

    def attention_layers(m):
        cores = [mod for mod in m.modules() if hasattr(mod, "to_qkv")]

        def run():
            x.grad = None
            sum(core(x, rotary_pos_emb=freqs).sum() for core in cores).backward()
        return run

    attn_theirs, attn_ours = _best_interleaved([attention_layers(model), attention_layers(patched)],
                                               max(args.repeat, 3), device)
    print(f"attention modules only (forward + backward, {cfg['depth']} layers): DALLE-pytorch "
          f"{attn_theirs * 1e3:8.1f} ms, patched {attn_ours * 1e3:8.1f} ms: {attn_theirs / attn_ours:.2f}x "
          f"({attn_theirs / train_theirs:.0%} of DALLE-pytorch's training step)")
    images = b * model.image_seq_len
    return {"peer": "dalle_pytorch", "peer_version": dalle_pytorch.__version__, "model": cfg | {"batch": b},
            "sampling": sampling, "machine": machine(device), "repeat": args.repeat,
            "results": [
                {"what": "generate", "dalle_pytorch_s": gen_theirs, "dalle_fast_s": gen_ours,
                 "speedup": gen_theirs / gen_ours, "dalle_fast_tokens_per_s": images / gen_ours,
                 "dalle_fast_compiled_s": gen_compiled, "compile_s": compile_s,
                 "compiled_speedup": None if gen_compiled is None else gen_theirs / gen_compiled},
                {"what": "train_step", "dalle_pytorch_s": train_theirs, "dalle_fast_s": train_ours,
                 "speedup": train_theirs / train_ours},
                {"what": "attention_modules_fwd_bwd", "dalle_pytorch_s": attn_theirs, "dalle_fast_s": attn_ours,
                 "speedup": attn_theirs / attn_ours}]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    p.add_argument("--batch", type=int, default=None, help="prompts (default 1; 4 with --peer)")
    p.add_argument("-n", type=int, default=16, help="candidates per prompt")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--modes", default=",".join(ATTENTION_MODES))
    p.add_argument("--full", action="store_true", help="time the no-cache baseline on complete generations too")
    p.add_argument("--sample-steps", type=int, default=8, help="no-cache steps timed when not --full")
    p.add_argument("--quick", action="store_true", help="tiny preset, complete generations")
    p.add_argument("--repeat", type=int, default=2, help="timings per measurement; the best counts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="directory (default: bench/out)")
    p.add_argument("--compile", action="store_true",
                   help="also time dalle_fast with its decode step compiled (torch.compile; CPU)")
    p.add_argument("--no-graph", action="store_true",
                   help="also time dalle_fast on CUDA without its CUDA graph (mode nograph: the eager step)")
    p.add_argument("--peer", choices=["dalle_pytorch"], default=None,
                   help="compare with another codebase's generation and training step instead")
    args = p.parse_args(argv)
    check_cuda(p, args.device)
    if args.compile and args.device != "cpu":
        p.error("--compile: the compiled decode step runs on the CPU (CUDA captures a CUDA graph)")
    if args.no_graph and args.device != "cuda":
        p.error("--no-graph: the CUDA graph is captured on CUDA only")
    check_at_least(p, args, 1, "--batch", "-n", "--sample-steps", "--repeat", "--threads")
    check_finite(p, args, "--cfg-scale")
    modes = comma_list(p, "--modes", args.modes, ATTENTION_MODES)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.batch is None:
        args.batch = 4 if args.peer else 1
    if args.peer:
        result = peer_dalle_pytorch(args, device)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"generate_peer_{args.peer}.json").write_text(json.dumps(result, indent=2))
        return 0
    if args.quick:
        args.preset, args.full = "tiny", True
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    cfg = DALLEConfig.preset(args.preset)
    model = DALLE(cfg).to(device=device, dtype=dtype).eval()
    text = torch.randint(0, cfg.pad_base - 1, (args.batch, cfg.text_len - 1), device=device)
    images = args.batch * args.n
    tokens = images * cfg.image_tokens
    rows = []
    print(f"# {args.preset}: text {cfg.text_len} + {cfg.image_size}x{cfg.image_size} image tokens, depth {cfg.depth}, "
          f"dim {cfg.dim}, {args.batch} prompt(s) x {args.n}, cfg_scale {args.cfg_scale}, {dtype}, {device}")
    # complete generations of the measured modes run in turn (after one warm-up each), so a change
    # in the machine's load hits them alike
    measured = [m for m in modes if args.full or m != "none"]
    if args.compile:
        modes, measured = modes + ["compiled"], measured + ["compiled"]
    if args.no_graph:
        modes, measured = modes + ["nograph"], measured + ["nograph"]

    def full_run(mode):
        if mode == "nograph":
            return lambda: generate_codes(model, text, args.n, attention="sparse", seed=0, cfg_scale=args.cfg_scale,
                                          cuda_graph=False)
        if mode == "compiled":
            return lambda: generate_codes(model, text, args.n, attention="sparse", seed=0, cfg_scale=args.cfg_scale,
                                          compile=True)
        return lambda: generate_codes(model, text, args.n, attention=mode, seed=0, cfg_scale=args.cfg_scale,
                                      compile=False)

    compile_s = _first_call(full_run("compiled"), device) if args.compile else None
    full_secs = dict(zip(measured, _best_interleaved([full_run(m) for m in measured], args.repeat, device)))
    if args.compile:
        compile_s -= full_secs["compiled"]
    for mode in modes:
        if mode in full_secs:
            secs, first, step = full_secs[mode], None, None
            how = f"measured, best of {args.repeat} (modes interleaved)"
        else:
            secs, first, step = time_uncached_sampled(model, text, args.n, args.cfg_scale, device,
                                                      args.sample_steps, args.repeat)
            how = f"estimated from {args.sample_steps} evenly spread steps, best of {args.repeat} each"
        rows.append({"mode": mode, "seconds": secs, "images_per_s": images / secs, "tokens_per_s": tokens / secs,
                     "first_step_s": first, "mean_step_s": step, "how": how})
        print(f"{mode:>7}: {secs:9.2f} s/generation  {images / secs:8.3f} images/s  {tokens / secs:10.1f} tokens/s"
              f"  ({how}{'' if step is None else f'; mean step {step * 1e3:.0f} ms'})")
    base = {r["mode"]: r["seconds"] for r in rows}
    if "sparse" in base:
        for r in rows:
            r["speedup_of_sparse"] = r["seconds"] / base["sparse"]
        for other in ("dense", "none"):
            if other in base:
                print(f"dalle_fast vs {other}: {base[other] / base['sparse']:.1f}x images/s")
    if "nograph" in base and "sparse" in base:
        print(f"dalle_fast with CUDA graph vs without: {base['nograph'] / base['sparse']:.2f}x images/s")
    if "compiled" in base:
        for other in ("sparse", "dense", "none"):
            if other in base:
                print(f"dalle_fast compiled vs {other}: {base[other] / base['compiled']:.2f}x images/s")
        print(f"compile time: {compile_s:.1f} s (first compiled call less a compiled generation)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args) | {"out": str(args.out), "dtype": str(dtype)}, "machine": machine(device),
              "compile_s": compile_s,
              "model": {"preset": args.preset, "text_len": cfg.text_len, "image_size": cfg.image_size,
                        "depth": cfg.depth, "dim": cfg.dim, "heads": cfg.heads, "dim_head": cfg.dim_head},
              "results": rows}
    (args.out / "generate.json").write_text(json.dumps(result, indent=2))
    with open(args.out / "generate.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
