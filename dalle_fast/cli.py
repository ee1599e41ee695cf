"""The ``dalle-fast`` command line.

Subcommands live in :data:`SUBCOMMANDS`; other modules add theirs with :func:`register_subcommand`
(``demo`` in :mod:`dalle_fast.demo`)::

    dalle-fast train-vae --out runs/vae                   # built-in shapes data, the defaults' recipe
    dalle-fast train-vae --preset paper --data /data/images --out runs/dvae     # image folder
    torchrun --nproc-per-node 8 -m dalle_fast.cli train-vae ...                 # DDP
    dalle-fast train-clip --out runs/clip                 # CLIP and the tokenizer (runs/clip/tokenizer.json)
    dalle-fast train --dvae runs/vae --tokenizer runs/clip/tokenizer.json --out runs/dalle
    dalle-fast generate "a large red circle in the center" --checkpoint runs/dalle --clip runs/clip --rerank
    dalle-fast demo --out demo       # everything above on the shapes data, with an accuracy report

Ctrl-C or SIGTERM in training saves the step and prints the command that resumes (``--resume auto``).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Subcommand:
    """``configure(parser)`` adds the arguments; ``run(args)`` executes and returns an exit code."""
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
                        run: Callable[[argparse.Namespace], int | None]) -> None:
    """Add (or replace) the subcommand ``name``."""
    SUBCOMMANDS[name] = Subcommand(help, configure, run)


# -- shared options --------------------------------------------------------------------------------
def add_training_arguments(p: argparse.ArgumentParser, presets: Sequence[str], default_preset: str,
                           default_lr: float, default_steps: int = 1000, default_batch_size: int = 32,
                           preset_help: str = "model size preset") -> None:
    """Options every training subcommand shares (data, schedule, checkpoints, devices). The defaults
    are each command's recipe for the built-in shapes data on a CPU (README, "Train and generate on
    the built-in shapes data")."""
    p.add_argument("--preset", choices=list(presets), default=default_preset, help=preset_help)
    p.add_argument("--data", type=Path, default=None,
                   help="image folder (name.png + name.txt); default: the built-in shapes dataset")
    p.add_argument("--shapes-length", type=int, default=20_000, help="number of built-in shapes samples")
    p.add_argument("--max-shapes", type=int, choices=[1, 2], default=1,
                   help="shapes per built-in scene: 1, or 2 (one or two shapes in a spatial relation)")
    p.add_argument("--holdout", action="append", default=[],
                   help="attribute combination to hold out of the shapes data, e.g. 'green triangle' (repeatable; "
                        "default: none)")
    p.add_argument("--steps", type=int, default=default_steps, help="optimisation steps in total")
    p.add_argument("--batch-size", type=int, default=default_batch_size, help="global batch size (all ranks)")
    p.add_argument("--lr", type=float, default=default_lr, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps, then cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of the weight matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, the initialisation and the shapes data")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on GPUs that support it, fp32 otherwise")
    p.add_argument("--out", type=Path, required=True, help="output directory (checkpoints, metrics.jsonl)")
    p.add_argument("--resume", default=None,
                   help="checkpoint file or directory, or 'auto' (newest in --out); default: start a new run")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints (also written at the end and on Ctrl-C / SIGTERM)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept in --out")
    p.add_argument("--log-every", type=int, default=10, help="steps between records in OUT/metrics.jsonl")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (0: load in the main process)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1; default: CUDA if available, else CPU")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default, one per core); 1 is faster on a CPU that other jobs "
                        "also use")


def train_config_from_args(args: argparse.Namespace):
    from .train import TrainConfig
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip or None, seed=args.seed,
                       precision=args.precision, checkpoint_every=args.checkpoint_every,
                       keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
                       num_workers=args.num_workers, progress=not args.no_progress)


def dataset_from_args(args: argparse.Namespace, image_size: int):
    """The image folder of ``--data`` or the built-in shapes dataset, at ``image_size``."""
    if args.data is not None:
        from .data.folder import ImageFolderDataset
        return ImageFolderDataset(args.data, size=image_size, seed=args.seed)
    from .data.shapes import ShapesDataset
    return ShapesDataset(size=image_size, length=args.shapes_length, seed=args.seed, holdout=args.holdout,
                         max_shapes=args.max_shapes)


def _report(trainer, out: Path) -> int:
    from .checkpoint import latest_checkpoint
    if trainer.rank == 0:
        if not trainer.history:  # resumed at its last step: nothing trained, no loss to show
            print(f"done: already at step {trainer.step} of {trainer.config.steps}, nothing to train; "
                  f"checkpoint {latest_checkpoint(out)}")
            return 0
        print(f"done: step {trainer.step}, loss {trainer.history[-1]['loss']:.4f}, "
              f"checkpoint {latest_checkpoint(out)}")
    return 0


# -- train-vae -------------------------------------------------------------------------------------
def _configure_train_vae(p: argparse.ArgumentParser) -> None:
    from .models.dvae import DVAE_PRESETS
    add_training_arguments(p, sorted(DVAE_PRESETS), "demo", 3e-3, default_steps=1800, default_batch_size=32,
                           preset_help="demo: 32 px -> 8x8 codes, 128 codes, the recipe for short runs on the shapes "
                                       "data; tiny, small, paper: 32, 64, 256 px with the paper's training recipe")
    p.add_argument("--image-size", type=int, default=None, help="image size; default: the preset's")


def _run_train_vae(args: argparse.Namespace) -> int:
    from .models.dvae import DVAEConfig
    from .train import init_distributed, resolve_device, train_dvae
    init_distributed()
    device = resolve_device(args.device, "--device")
    overrides = {"image_size": args.image_size} if args.image_size is not None else {}
    cfg = DVAEConfig.preset(args.preset, **overrides)
    dataset = dataset_from_args(args, cfg.image_size)
    trainer = train_dvae(cfg, train_config_from_args(args), dataset, args.out, resume=args.resume, device=device)
    return _report(trainer, args.out)


# -- train-clip ------------------------------------------------------------------------------------
def _configure_train_clip(p: argparse.ArgumentParser) -> None:
    from .models.clip import CLIP_PRESETS
    add_training_arguments(p, sorted(CLIP_PRESETS), "tiny", 5e-4, default_steps=2000, default_batch_size=64,
                           preset_help="tiny: 32 px, small: 64 px, base: 256 px")
    add_tokenizer_arguments(p)


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer JSON (must exist); default: OUT/tokenizer.json, trained on the captions if missing")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size when training a tokenizer; default: 16384 (a small corpus gives fewer)")
    p.add_argument("--text-len", type=int, default=None,
                   help="text positions when training a tokenizer; default: the longest training caption's tokens "
                        "(at most 256)")


def tokenizer_from_args(args: argparse.Namespace, dataset):
    """The run's tokenizer from ``--tokenizer``, ``--vocab-size``, ``--text-len`` and ``--out``
    (:func:`dalle_fast.train.prepare_tokenizer`)."""
    from .train import prepare_tokenizer
    return prepare_tokenizer(dataset, args.out, args.tokenizer, vocab_size=args.vocab_size, text_len=args.text_len,
                             names={"path": "--tokenizer", "out_dir": "--out", "vocab_size": "--vocab-size",
                                    "text_len": "--text-len"})


def _run_train_clip(args: argparse.Namespace) -> int:
    from .models.clip import CLIPConfig
    from .train import init_distributed, resolve_device, train_clip
    init_distributed()
    device = resolve_device(args.device, "--device")
    cfg = CLIPConfig.preset(args.preset)
    dataset = dataset_from_args(args, cfg.image_size)
    tokenizer = tokenizer_from_args(args, dataset)
    cfg = CLIPConfig.for_tokenizer(tokenizer, args.preset)
    trainer = train_clip(cfg, tokenizer, train_config_from_args(args), dataset, args.out, resume=args.resume,
                         device=device)
    return _report(trainer, args.out)


register_subcommand("train-vae", "train the discrete VAE (stage 1)", _configure_train_vae, _run_train_vae)
register_subcommand("train-clip", "train the CLIP reranker", _configure_train_clip, _run_train_clip)

# -- train (the transformer) -----------------------------------------------------------------------
def _configure_train(p: argparse.ArgumentParser) -> None:
    from .models.dalle import DALLE_PRESETS
    add_training_arguments(p, sorted(DALLE_PRESETS), "tiny", 1e-3, default_steps=1200, default_batch_size=64,
                           preset_help="tiny: 4 layers of width 192 (text 16 + 8x8 image tokens), small: 8 layers "
                                       "of 256 (256 + 32x32), paper: 64 layers of 3968")
    add_tokenizer_arguments(p)
    p.add_argument("--dvae", type=Path, required=True, help="trained dVAE checkpoint (file or directory)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="probability of training on padding text (what classifier-free guidance needs)")
    p.add_argument("--encode-batch-size", type=int, default=64, help="images per dVAE encoding batch")


def _run_train(args: argparse.Namespace) -> int:
    from .data.codes import data_fingerprint
    from .train import init_distributed, load_dvae, prepare_dalle_training, resolve_device, train_dalle
    init_distributed()
    device = resolve_device(args.device, "--device")
    dvae_ck, dvae = load_dvae(args.dvae, device)
    dataset = dataset_from_args(args, dvae.config.image_size)
    tokenizer = tokenizer_from_args(args, dataset)
    # what the dataset is made from: a change in any of these re-encodes the cached codes
    data_describe = {"data": str(args.data),
                     "data_files": data_fingerprint(args.data) if args.data is not None else None,
                     "seed": args.seed, "shapes_length": args.shapes_length, "max_shapes": args.max_shapes,
                     "holdout": list(args.holdout)}
    cfg, codes, extra_meta = prepare_dalle_training(
        dvae_ck, dvae, tokenizer, dataset, args.out, preset=args.preset, caption_dropout=args.caption_dropout,
        resume=args.resume, data_describe=data_describe, encode_batch_size=args.encode_batch_size,
        progress=not args.no_progress, resume_flag="--resume")
    del dvae
    trainer = train_dalle(cfg, train_config_from_args(args), codes, args.out, resume=args.resume, device=device,
                          extra_meta=extra_meta)
    return _report(trainer, args.out)


# -- generate --------------------------------------------------------------------------------------
def _configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("captions", nargs="+", help="caption(s) to draw")
    p.add_argument("--checkpoint", type=Path, required=True, help="transformer checkpoint (file or directory)")
    p.add_argument("--dvae", type=Path, default=None, help="dVAE checkpoint; default: the one used in training")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer JSON; default: tokenizer.json beside the "
                   "checkpoint")
    p.add_argument("--clip", type=Path, default=None, help="CLIP checkpoint for --rerank; default: none")
    p.add_argument("-n", "--num-images", type=int, default=16, help="candidates per caption")
    p.add_argument("--rerank", action="store_true", help="sort the candidates by CLIP score (needs --clip)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely codes only (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of codes with this "
                   "much probability (1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of candidate i is seed + i")
    p.add_argument("--batch-size", type=int, default=None, help="candidates per decode batch; default: all at once")
    p.add_argument("--out", type=Path, default=Path("samples"), help="output directory for the PNGs")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda; default: CUDA if available, else CPU")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import load_pipeline
    from .images import save_grid
    from .train import resolve_device
    if args.rerank and args.clip is None:
        raise ValueError("--rerank needs --clip CHECKPOINT")
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    pipe = load_pipeline(args.checkpoint, dvae=args.dvae, clip=args.clip if args.rerank else None,
                         tokenizer=args.tokenizer, device=device)
    result = pipe(args.captions, args.num_images, cfg_scale=args.cfg_scale, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                  progress=not args.no_progress)
    for i, caption in enumerate(result.captions):
        stem = "" if len(result.captions) == 1 else f"-{i}"
        save_grid(result.images[i], args.out / f"grid{stem}.png")  # (+ grid-1x.png at the original size)
        save_grid(result.images[i, :1], args.out / f"top{stem}.png", columns=1)
        best = f", best CLIP score {result.scores[i, 0]:.3f}" if result.scores is not None else ""
        print(f"{caption!r}: {args.out / f'grid{stem}.png'}, {args.out / f'top{stem}.png'}{best}")
    return 0


register_subcommand("train", "train the DALL-E transformer on dVAE codes (stage 2)", _configure_train, _run_train)
register_subcommand("generate", "generate images for captions (optionally CLIP-reranked)", _configure_generate,
                    _run_generate)

from . import demo as _demo  # noqa: E402  (stdlib-only at import time)

register_subcommand("demo", "train tiny dVAE, CLIP and transformer on the shapes data; write an accuracy report",
                    _demo.configure, _demo.run)



class _VersionAction(argparse.Action):
    """``--version``: the versions and the instruction set of the CPU kernels (imports torch only
    when asked, so ``--help`` stays fast)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        import dalle_fast

        try:
            isa = f"{dalle_fast.cpu_isa()} (this CPU runs: {', '.join(dalle_fast.available_cpu_isas())})"
        except RuntimeError as err:  # a bad $DALLE_FAST_CPU_ISA
            isa = f"error: {str(err).splitlines()[0]}"
        print(f"dalle_fast {dalle_fast.__version__} (torch {torch.__version__}); CPU kernels: {isa}")
        parser.exit()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default; options without one to show (flags, ``None``: the help
    text says what happens then, empty lists) are left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [], argparse.SUPPRESS) or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle-fast", description="dalle_fast: DALL-E training and sampling",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions and the instruction set the CPU kernels run with, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, formatter_class=HelpFormatter)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line ("warning: ..."), without the source line, printed above a progress bar."""
    from tqdm.auto import tqdm
    tqdm.write(f"warning: {message}", file=sys.stderr)


def _resume_command(argv: Sequence[str]) -> str:
    """The command line that continues an interrupted run: the same arguments with ``--resume auto``."""
    import shlex
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            args.append(arg)
    return shlex.join(["dalle-fast", *args, "--resume", "auto"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dalle-fast`` console script; returns the exit code."""
    import warnings

    from .train import TrainingInterrupted
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        threads = getattr(args, "threads", 0)
        if threads:
            if threads < 0:
                raise ValueError(f"--threads must be >= 0, got {threads}")
            import torch
            torch.set_num_threads(threads)
        return int(args._run(args) or 0)
    except ValueError as err:  # bad user input: one line, not a traceback
        print(f"dalle-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a diverging run: what happened and where to restart from
        print(f"dalle-fast {args.command}: training diverged: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:  # the step was finished and saved: say where, and how to go on
        if stop.checkpoint is not None:
            print(f"dalle-fast {args.command}: {stop}; resume with: {_resume_command(argv)}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one outside training
        from .checkpoint import latest_checkpoint
        out = getattr(args, "out", None)
        newest = latest_checkpoint(out) if out is not None and args.command.startswith("train") else None
        print(f"dalle-fast {args.command}: aborted" + (f"; the newest checkpoint is {newest}" if newest else ""),
              file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
