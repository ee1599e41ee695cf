"""``dalle-fast demo``: train tiny dVAE, CLIP and transformer on the built-in shapes data with some
attribute combinations held out, generate for held-out and seen captions, score the images with the
dataset's rule-based scorer and write a report (markdown table, PNG grids, JSON numbers).

Everything reuses the library: :func:`dalle_fast.train.train_dvae` / ``train_clip`` / ``train_dalle``,
:func:`dalle_fast.data.codes.encode_dataset`, :func:`dalle_fast.generate.generate_images` and
:func:`dalle_fast.data.shapes.score`.

Accuracy of "CLIP top-1 of N": the ``C`` candidates of a caption (sampling order, seed ``seed + i``)
are cut into ``C / N`` groups of ``N``; in each group CLIP picks one image and the scorer judges it;
the accuracy is the mean over groups and captions. "No reranking" judges the first image of each group
(every candidate, for ``N = 1``), "any of N" whether at least one image of the group is correct (the
ceiling of any reranker). Chance: the scorer's acceptance of real images of random *other* captions,
and the same with CLIP picking the best of 16 such images.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

DEFAULT_HOLDOUT = ("red triangle", "green square", "blue circle")
N_VALUES = (1, 4, 16)
MAX_CAPTIONS = 54  # default evaluation captions per split (all 54 held-out ones of the default hold-out)
TIME_TARGET_S = 20 * 60  # the whole demo in under 20 minutes on a 2-core CPU


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo"), help="output directory (report.md, PNGs, checkpoints)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data and a few steps (seconds, not minutes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, every model's training and the sampling")
    p.add_argument("--holdout", action="append", default=None,
                   help=f"attribute combination held out of training (repeatable); default: {list(DEFAULT_HOLDOUT)}")
    p.add_argument("--max-shapes", type=int, choices=[1, 2], default=1,
                   help="shapes per scene: 1 (colour, shape, size, grid position) or 2 (two shapes in a relation)")
    p.add_argument("--dataset-size", type=int, default=20_000, help="training scenes")
    p.add_argument("--dvae-steps", type=int, default=1800, help="dVAE training steps")
    p.add_argument("--clip-steps", type=int, default=5000, help="CLIP training steps")
    p.add_argument("--dalle-steps", type=int, default=1200, help="transformer training steps")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of CLIP and transformer training")
    p.add_argument("--dvae-batch-size", type=int, default=32, help="batch size of dVAE training")
    p.add_argument("--dvae-lr", type=float, default=3e-3, help="dVAE peak learning rate")
    p.add_argument("--dvae-vocab", type=int, default=128, help="dVAE codebook size (image vocabulary)")
    p.add_argument("--dvae-hidden", type=int, default=32, help="dVAE width n_hid (multiple of 4)")
    p.add_argument("--dim", type=int, default=192, help="transformer width")
    p.add_argument("--depth", type=int, default=4, help="transformer layers (paper schedule of row/col/conv masks)")
    p.add_argument("--captions", type=int, default=None,
                   help=f"evaluation captions per split; default: every held-out caption, at most {MAX_CAPTIONS} "
                        "(54 with the default hold-out)")
    p.add_argument("--candidates", type=int, default=32,
                   help="images per caption (a multiple of 16; 32 = two groups of 16 per caption)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1: off)")
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is faster on a CPU shared with other jobs")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bars")


def _apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        for name, value in (("dataset_size", 64), ("dvae_steps", 3), ("clip_steps", 3), ("dalle_steps", 3),
                            ("batch_size", 16), ("dvae_batch_size", 16), ("captions", 2), ("dim", 64), ("depth", 2)):
            setattr(args, name, value)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("dataset_size", "dvae_steps", "clip_steps", "dalle_steps", "batch_size", "dvae_batch_size",
                 "dvae_vocab", "dvae_hidden", "dim", "depth", "captions", "candidates"):
        value = getattr(args, name)
        if name == "captions" and value is None:
            continue
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
    if not args.dvae_lr > 0:
        raise ValueError(f"--dvae-lr must be > 0, got {args.dvae_lr}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    # the sampling arguments are only used after all three models are trained: checked up front
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale must be finite, got {args.cfg_scale}")
    if args.candidates % max(N_VALUES):
        raise ValueError(f"--candidates must be a multiple of {max(N_VALUES)}, got {args.candidates}")
    if args.dvae_hidden % 4:
        raise ValueError(f"--dvae-hidden must be a multiple of 4, got {args.dvae_hidden}")
    if args.dim % 32:
        raise ValueError(f"--dim must be a multiple of 32 (heads of 32), got {args.dim}")
    if args.dataset_size < max(args.batch_size, args.dvae_batch_size):
        raise ValueError(f"--dataset-size {args.dataset_size} is smaller than one batch")


def demo_dvae_config(steps: int, vocab_size: int = 128, n_hid: int = 32):
    """The demo's short-run dVAE recipe: the ``demo`` preset of
    :class:`~dalle_fast.models.dvae.DVAEConfig` (32 px -> 8x8 codes, Gaussian likelihood) with its
    temperature anneal spread over all ``steps`` and its KL warmup over the first 10% of them."""
    from .models.dvae import DVAEConfig
    return DVAEConfig.preset("demo", vocab_size=vocab_size, n_hid=n_hid, n_init=n_hid, tau_anneal_steps=steps,
                             kl_warmup_steps=max(1, steps // 10))


def machine_description() -> dict:
    """CPU model, core count, load, Python/torch versions (for the report)."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def distinct_captions(dataset, count: int, allow_fewer: bool = False) -> list[str]:
    """The first ``count`` distinct captions of ``dataset`` in index order (all of them, if it holds
    fewer and ``allow_fewer``)."""
    seen: dict[str, None] = {}
    for i in range(len(dataset)):
        seen.setdefault(dataset.scene(i).caption, None)
        if len(seen) == count:
            break
    if len(seen) < count and not allow_fewer:
        raise ValueError(f"the dataset holds only {len(seen)} distinct captions, fewer than --captions {count}")
    return list(seen)


def group_accuracy(correct, clip_scores, n: int) -> dict:
    """``correct`` bool ``(P, C)`` and ``clip_scores`` ``(P, C)`` in sampling order -> accuracies over
    the groups of ``n`` consecutive candidates: ``first`` image, CLIP's top-1 (``reranked``), ``any``
    image of the group correct."""
    P, C = correct.shape
    c = correct.reshape(P, C // n, n).float()
    top = clip_scores.reshape(P, C // n, n).argmax(-1, keepdim=True)
    return {"first": c[..., 0].mean().item(), "reranked": c.gather(-1, top).mean().item(),
            "any": c.amax(-1).mean().item(), "groups": P * (C // n)}


def _clip_scores(clip, tokenizer, captions: list[str], images):
    """CLIP score of ``images`` ``(P, C, 3, H, W)`` against caption ``p`` -> ``(P, C)``."""
    import torch
    P, C = images.shape[:2]
    device = next(clip.parameters()).device  # CLIP may sit on the GPU, the images on the CPU
    ids = tokenizer.encode(captions, text_len=clip.config.text_len).repeat_interleave(C, 0)
    flat = images.flatten(0, 1)
    out = []
    with torch.no_grad():
        for start in range(0, P * C, 256):
            out.append(clip.score(ids[start:start + 256].to(device),
                                  flat[start:start + 256].to(device)).float().cpu())
    return torch.cat(out).view(P, C)


def chance_images(pool, captions: list[str], count: int, seed: int):
    """For each caption, ``count`` real images of random scenes with a different caption ->
    ``(P, count, 3, H, W)``."""
    import numpy as np
    import torch

    from .data.shapes import pil_to_tensor, render
    rng = np.random.default_rng([seed, 991])
    out = []
    for caption in captions:
        imgs = []
        while len(imgs) < count:
            scene = pool.scene(int(rng.integers(len(pool))))
            if scene.caption != caption:
                imgs.append(pil_to_tensor(render(scene, pool.size)))
        out.append(torch.stack(imgs))
    return torch.stack(out)


def _score_all(images, captions: list[str], progress: bool, desc: str):
    import torch
    from tqdm.auto import tqdm

    from .data.shapes import score
    P, C = images.shape[:2]
    correct = torch.zeros(P, C, dtype=torch.bool)
    for p in tqdm(range(P), disable=not progress, desc=desc, unit="caption"):
        for c in range(C):
            correct[p, c] = bool(score(images[p, c], captions[p]))
    return correct


def _row_grid(images, path: Path, rows: int) -> None:
    """First ``rows`` captions, one row of candidates each (``images`` ``(P, C, 3, H, W)``)."""
    from .images import save_grid
    sel = images[:rows]
    save_grid(sel.flatten(0, 1), path, columns=sel.shape[1])


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}%"


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo; returns the results dict (also written to OUT/results.json)."""
    import torch

    from .data.codes import CodesDataset, encode_dataset
    from .data.shapes import ShapesDataset
    from .generate import generate_images
    from .models.clip import CLIPConfig
    from .models.dalle import DALLEConfig
    from .tokenizer import Tokenizer
    from .train import TrainConfig, train_clip, train_dalle, train_dvae

    _apply_quick(args)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    holdout = list(DEFAULT_HOLDOUT if args.holdout is None else args.holdout)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # the demo trains from scratch: a rerun into the same OUT replaces its own earlier checkpoints
    # (training refuses to start a new run over another run's checkpoints)
    from .checkpoint import remove_checkpoints
    for stage in ("dvae", "clip", "dalle"):
        remove_checkpoints(out / stage)
    progress = not args.no_progress
    machine = machine_description()
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    def tcfg(steps: int, batch: int, lr: float) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=min(100, max(1, steps // 10)),
                           seed=args.seed, checkpoint_every=steps, keep_checkpoints=1, log_every=max(1, min(50, steps)),
                           progress=progress)

    size = 32
    train_set = ShapesDataset(size=size, length=args.dataset_size, seed=args.seed, holdout=holdout,
                              max_shapes=args.max_shapes)
    # evaluation captions: held-out combinations, and seen ones from a fresh draw of the training split
    n_captions = MAX_CAPTIONS if args.captions is None else args.captions
    eval_len = max(2000, 20 * n_captions)
    heldout_captions = distinct_captions(
        ShapesDataset(size, eval_len, args.seed + 1, holdout, "heldout", args.max_shapes), n_captions,
        allow_fewer=args.captions is None)
    seen_captions = distinct_captions(ShapesDataset(size, eval_len, args.seed + 1, holdout, "train", args.max_shapes),
                                      len(heldout_captions))

    # 1. dVAE
    t = time.perf_counter()
    dvae_cfg = demo_dvae_config(args.dvae_steps, vocab_size=args.dvae_vocab, n_hid=args.dvae_hidden)
    dvae_tr = train_dvae(dvae_cfg, tcfg(args.dvae_steps, args.dvae_batch_size, args.dvae_lr), train_set,
                         out / "dvae", device=args.device)
    dvae = dvae_tr.model.eval()
    timings["dvae_train_s"] = time.perf_counter() - t

    # 2. tokenizer + CLIP
    t = time.perf_counter()
    tokenizer = Tokenizer.train(train_set.captions(), vocab_size=400, text_len=15)
    tokenizer.save(out / "tokenizer.json")
    clip_cfg = CLIPConfig.for_tokenizer(tokenizer, "tiny", image_size=size)
    clip_tr = train_clip(clip_cfg, tokenizer, tcfg(args.clip_steps, args.batch_size, 5e-4), train_set, out / "clip",
                         device=args.device)
    clip = clip_tr.model.eval()
    timings["clip_train_s"] = time.perf_counter() - t

    # 3. encode once, train the transformer
    t = time.perf_counter()
    dalle_cfg = DALLEConfig.for_tokenizer(tokenizer, "tiny", image_size=dvae_cfg.latent_size,
                                          image_vocab=dvae_cfg.vocab_size, dim=args.dim, depth=args.depth,
                                          heads=args.dim // 32, dim_head=32)
    describe = {"demo": True, "seed": args.seed, "dataset_size": args.dataset_size, "holdout": holdout,
                "max_shapes": args.max_shapes, "dvae_steps": args.dvae_steps,
                "tokenizer": tokenizer.fingerprint()}
    import hashlib
    describe["dvae_sha"] = hashlib.sha256(b"".join(
        p.detach().cpu().numpy().tobytes() for p in dvae.state_dict().values())).hexdigest()
    encode_dataset(dvae, tokenizer, train_set, dalle_cfg.text_len - 1, out / "codes", describe,
                   batch_size=256, progress=progress)
    timings["encode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    dalle_tr = train_dalle(dalle_cfg, tcfg(args.dalle_steps, args.batch_size, 1e-3), CodesDataset.load(out / "codes"),
                           out / "dalle", device=args.device)
    model = dalle_tr.model.eval()
    timings["dalle_train_s"] = time.perf_counter() - t

    # 4. generate, rerank, score
    results: dict = {"splits": {}}
    grids = {}
    for split, captions in (("seen", seen_captions), ("held-out", heldout_captions)):
        t = time.perf_counter()
        gen = generate_images(model, dvae, tokenizer, captions, args.candidates, clip=None, seed=args.seed,
                              temperature=args.temperature, cfg_scale=args.cfg_scale, progress=progress)
        timings[f"generate_{split}_s"] = time.perf_counter() - t
        images = gen.images.float().cpu()
        scores = _clip_scores(clip, tokenizer, captions, images)
        correct = _score_all(images, captions, progress, f"score {split}")
        results["splits"][split] = {
            "captions": captions,
            "accuracy": {str(n): group_accuracy(correct, scores, n) for n in N_VALUES},
        }
        order = scores.argsort(1, descending=True)
        ranked = images[torch.arange(len(captions))[:, None], order]
        name = f"{split.replace('-', '')}_reranked.png"
        _row_grid(ranked, out / name, rows=min(8, len(captions)))
        grids[split] = (name, captions[:min(8, len(captions))],
                        correct[torch.arange(len(captions))[:, None], order][:8])

    # 5. ceilings and chance
    t = time.perf_counter()
    pool = ShapesDataset(size, 20_000, args.seed + 2, (), "train", args.max_shapes)
    all_captions = seen_captions + heldout_captions
    chance_imgs = chance_images(pool, all_captions, max(N_VALUES), args.seed)
    chance_correct = _score_all(chance_imgs, all_captions, progress, "score chance")
    chance_scores = _clip_scores(clip, tokenizer, all_captions, chance_imgs)
    results["chance"] = {str(n): group_accuracy(chance_correct, chance_scores, n) for n in N_VALUES}
    # dVAE round trip of real images of the evaluation captions: the ceiling of the pipeline
    recon = {}
    for split, captions, ds in (("seen", seen_captions, ShapesDataset(size, eval_len, args.seed + 1, holdout, "train",
                                                                        args.max_shapes)),
                                ("held-out", heldout_captions, ShapesDataset(size, eval_len, args.seed + 1, holdout,
                                                                             "heldout", args.max_shapes))):
        idx, want = [], set(captions)
        for i in range(len(ds)):
            if ds.scene(i).caption in want:
                idx.append(i)
                want.discard(ds.scene(i).caption)
            if not want:
                break
        real = torch.stack([ds[i]["image"] for i in idx])
        with torch.no_grad():
            rt = dvae.decode(dvae.encode(real.to(next(dvae.parameters()).device))).float().cpu()
        caps = [ds.scene(i).caption for i in idx]
        recon[split] = _score_all(rt[:, None], caps, False, "").float().mean().item()
        recon[f"{split} (real images)"] = _score_all(real[:, None], caps, False, "").float().mean().item()
    results["dvae_roundtrip"] = recon
    last = dvae_tr.history[-1] if dvae_tr.history else {}
    results["dvae_codebook"] = {"vocab": args.dvae_vocab, "codes_used": last.get("codes_used"),
                                "perplexity": last.get("perplexity")}
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    results.update({
        "machine": machine, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "settings": {"quick": args.quick, "seed": args.seed, "holdout": holdout, "max_shapes": args.max_shapes,
                     "image_size": size, "codes": f"{dvae_cfg.latent_size}x{dvae_cfg.latent_size}",
                     "dvae_vocab": args.dvae_vocab, "dvae_hidden": args.dvae_hidden, "dataset_size": args.dataset_size,
                     "dvae_steps": args.dvae_steps, "dvae_batch_size": args.dvae_batch_size, "dvae_lr": args.dvae_lr,
                     "dvae_likelihood": dvae_cfg.likelihood,
                     "clip_steps": args.clip_steps, "dalle_steps": args.dalle_steps, "batch_size": args.batch_size,
                     "dim": args.dim, "depth": args.depth, "layer_kinds": list(dalle_cfg.layer_kinds()),
                     "text_len": dalle_cfg.text_len, "text_vocab": dalle_cfg.text_vocab,
                     "candidates": args.candidates, "captions_per_split": len(heldout_captions),
                     "temperature": args.temperature, "cfg_scale": args.cfg_scale, "device": args.device},
        "final_losses": {"dvae": dvae_tr.history[-1].get("loss") if dvae_tr.history else None,
                         "clip": clip_tr.history[-1].get("loss") if clip_tr.history else None,
                         "dalle_image": dalle_tr.history[-1].get("image_loss") if dalle_tr.history else None},
        "command": ("dalle-fast demo " + " ".join(sys.argv[2:])) if len(sys.argv) > 1 and sys.argv[1] == "demo"
        else None,
    })
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(render_report(results, grids))
    return results


def accuracy_rows(results: dict) -> list[tuple[str, int, str, str, str]]:
    """(split, N, no reranking, CLIP top-1 of N, any of N) rows of the table, in order."""
    rows = []
    for split in ("seen", "held-out"):
        acc = results["splits"][split]["accuracy"]
        for n in N_VALUES:
            a = acc[str(n)]
            rows.append((split, n, _fmt(a["first"]), _fmt(a["reranked"]), _fmt(a["any"])))
    for n in N_VALUES:
        a = results["chance"][str(n)]
        rows.append(("chance", n, _fmt(a["first"]), _fmt(a["reranked"]), _fmt(a["any"])))
    return rows


def targets(results: dict) -> list[tuple[str, bool, str]]:
    """The demo's quality and time targets: (what, met, numbers)."""
    acc = {s: results["splits"][s]["accuracy"] for s in ("seen", "held-out")}
    h16 = acc["held-out"]["16"]["reranked"]
    out = [("held-out accuracy >= 60% with N = 16 reranked", h16 >= 0.6, _fmt(h16))]
    for s in ("seen", "held-out"):
        a16, a1 = acc[s]["16"]["reranked"], acc[s]["1"]["first"]
        out.append((f"{s}: N = 16 reranked beats N = 1", a16 > a1, f"{_fmt(a16)} vs {_fmt(a1)}"))
    total = results["timings_s"]["total_s"]
    out.append(("whole run under 20 minutes", total < TIME_TARGET_S, f"{total:.0f} s ({total / 60:.1f} min)"))
    return out


def _codebook_line(results: dict) -> str:
    cb = results["dvae_codebook"]
    if cb["codes_used"] is None:
        return "dVAE codebook usage: not logged."
    return (f"dVAE codebook usage on the last training batch: {cb['codes_used']:.0f} of {cb['vocab']} codes "
            f"(perplexity {cb['perplexity']:.1f}).")


def render_report(results: dict, grids: dict) -> str:
    s, m, t = results["settings"], results["machine"], results["timings_s"]
    lines = ["# dalle-fast demo report", ""]
    if s["quick"]:
        lines += ["**Smoke run (`--quick`)**: a few training steps, the numbers mean nothing.", ""]
    missed = [what for what, met, _ in targets(results) if not met]
    lines += [("**Result: all targets are met** (measured, see the tables below)." if not missed else
               f"**Result: {len(missed)} of {len(targets(results))} targets are not met**: "
               + "; ".join(missed) + "."), ""]
    scene = ("one shape per scene: colour (5) x shape (3) x size (2) x grid position (9)" if s["max_shapes"] == 1
             else "one shape (colour, shape, size, position) or two shapes in a spatial relation")
    lines += [
        (f"Command: `{results['command']}`" if results["command"]
         else "Called from Python (`dalle_fast.cli.main`); the settings are below."), "",
        "## Setup", "",
        f"- Scenes: {scene}; {s['image_size']}x{s['image_size']} px images, {s['dataset_size']} training scenes.",
        f"- Held out of training (never seen together): {', '.join(repr(h) for h in s['holdout'])}.",
        f"- dVAE (`demo` preset: {s.get('dvae_likelihood', 'logit_laplace')} likelihood): {s['image_size']} px -> "
        f"{s['codes']} codes, codebook {s['dvae_vocab']}, width {s['dvae_hidden']}, "
        f"{s['dvae_steps']} steps x batch {s['dvae_batch_size']}, lr {s.get('dvae_lr', 1e-3):g}.",
        f"- CLIP (tiny preset): {s['clip_steps']} steps x batch {s['batch_size']}.",
        f"- Transformer: text {s['text_len']} (vocab {s['text_vocab']}) + {s['codes']} image tokens, width {s['dim']}, "
        f"layers {', '.join(s['layer_kinds'])}, {s['dalle_steps']} steps x batch {s['batch_size']}.",
        f"- Evaluation: {s['captions_per_split']} distinct captions per split, {s['candidates']} candidates each "
        f"(temperature {s['temperature']}, guidance scale {s['cfg_scale']}), judged by "
        "`dalle_fast.data.shapes.score` (count, colour, shape, size, position).",
        "",
        "## Caption accuracy", "",
        "Candidates are cut into groups of N (sampling order). *No reranking*: the first image of each group; "
        "*CLIP top-1 of N*: the image CLIP ranks first in the group; *any of N*: at least one image of the group "
        "is correct (the ceiling of a perfect reranker). *Chance*: real images of random other captions "
        "(N = 16 reranked: CLIP picks the best of 16 such images).", "",
        "| captions | N | no reranking | CLIP top-1 of N | any of N |", "|---|---|---|---|---|"]
    for split, n, first, rer, any_ in accuracy_rows(results):
        lines.append(f"| {split} | {n} | {first} | {rer} | {any_} |")
    rt = results["dvae_roundtrip"]
    lines += ["", f"Scorer on real images of the evaluation captions: seen {_fmt(rt['seen (real images)'])}, held-out "
              f"{_fmt(rt['held-out (real images)'])}; after a dVAE round trip (encode, decode; the ceiling of the "
              f"pipeline): seen {_fmt(rt['seen'])}, held-out {_fmt(rt['held-out'])}.", "",
              _codebook_line(results), "",
              "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    for what, met, nums in targets(results):
        lines.append(f"| {what} | {'yes' if met else '**no**'} | {nums} |")
    fl = results["final_losses"]
    lines += ["", "Final training losses: " + ", ".join(
        f"{k} {v:.4f}" for k, v in fl.items() if v is not None) + ".", "",
        "## Samples", "",
        "One row per caption, its candidates sorted by CLIP score (best on the left).", ""]
    for split, (name, caps, correct) in grids.items():
        lines += [f"### {split}", "", f"![{split} samples]({name})", ""]
        for i, c in enumerate(caps):
            lines.append(f"{i + 1}. {c} ({int(correct[i].sum())}/{correct.shape[1]} correct, "
                         f"top-ranked {'correct' if bool(correct[i, 0]) else 'wrong'})")
        lines.append("")
    lines += ["## Machine and timings", "",
              f"- {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['platform']}, "
              f"Python {m['python']}, torch {m['torch']}" + (f", GPU {m['gpu']}" if "gpu" in m else "")
              + f"; device `{s['device']}`.",
              f"- Load average at start: {m.get('load_average_at_start')} (the machine was shared; timings are noisy).",
              "", "| stage | seconds |", "|---|---|"]
    for k, v in t.items():
        lines.append(f"| {k.removesuffix('_s')} | {v:.1f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    results = run_demo(args)
    print(f"demo report: {args.out / 'report.md'} ({results['timings_s']['total_s']:.0f} s)")
    for what, met, nums in targets(results):
        print(f"  {'ok  ' if met else 'MISS'} {what}: {nums}")
    return 0
