"""Static resources of the Triton attention kernels on Hopper, without a GPU.

Compiles every kernel (forward, dK/dV, dQ) for each tile configuration to sm_90a cubin with this
machine's Triton and reads the result back with the ``cuobjdump`` / ``nvdisasm`` Triton ships:
registers per thread, stack (register spills), shared memory, and the SASS instructions that show
how the kernel moves data (``LDGSTS``: asynchronous global -> shared copies, ``HGMMA``: Hopper
warpgroup MMAs, ``LDG``/``STG``: plain global loads/stores), and ``bufs``, the depth of the
shallowest multi-buffered tile in shared memory (``num_stages`` when every streamed tile is
prefetched ``num_stages - 1`` iterations ahead; Triton single-buffers at 2 stages). The launches
are specialised as at the benchmark's shape (16-byte aligned pointers and strides divisible by 16),
as Triton's JIT would.

The program order of a configuration (``order``) is a launch argument, not compiled in: each
configuration is listed once, in order 0. ``/SM``: programs per H100 SM (registers, shared memory,
threads); ``cap``: the register cap the tuner would also try (``occupancy_cap``; ``-``: none).

What it cannot tell: time. It is the check that needs no GPU: a configuration that spills or
loses its asynchronous copies is slow on any Hopper card, and the default configurations (used
under CUDA-graph capture before tuning, and with tuning off) must do neither. Register allocation
is ptxas's, so a different Triton release can differ.

    python bench/kernel_resources.py                       # defaults + candidates, bf16, D=64, row/col
    python bench/kernel_resources.py --kinds conv --head-dims 128 --defaults-only
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

ROOT = Path(__file__).resolve().parent.parent
try:
    import dalle_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import triton  # noqa: E402

from dalle_fast import KINDS  # noqa: E402
from dalle_fast.ops import triton_kernels as kernels  # noqa: E402

K = kernels()  # imports triton (not interpreted: TRITON_INTERPRET is unset above)
from dalle_fast.kernels import hopper_plan  # noqa: E402
from dalle_fast.kernels.resources import (KERNELS, compile_for_hopper, compile_hopper_backward,  # noqa: E402
                                          compile_hopper_forward, hopper_ws_supported, resources,
                                          warp_specialized)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import comma_list  # noqa: E402

DTYPE_NAMES = tuple(str(d).replace("torch.", "") for d in K.DTYPES)  # float16, bfloat16, float32


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="row,col")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--head-dims", default="64")
    p.add_argument("--defaults-only", action="store_true", help="only the default configurations")
    args = p.parse_args(argv)
    kinds = comma_list(p, "--kinds", args.kinds, KINDS)
    dtypes = comma_list(p, "--dtypes", args.dtypes, DTYPE_NAMES)
    try:
        head_dims = [int(x) for x in args.head_dims.split(",")]
    except ValueError:
        p.error(f"--head-dims must be a comma list of integers, got {args.head_dims!r}")
    bad = [d for d in head_dims if d not in K.HEAD_DIMS]
    if bad:
        p.error(f"--head-dims: the kernels serve head_dim {', '.join(map(str, K.HEAD_DIMS))}, got "
                f"{', '.join(map(str, bad))}")
    print(f"# Triton {triton.__version__}, sm_90a, B*H any, H=16, N=1280 (text 256 + 32 x 32)")
    print(f"{'kernel':<8} {'kind':<9} {'dtype':<9} {'D':>4} {'config (M, N, warps, stages, flat, order, maxnreg)':<49} {'regs':>5} "
          f"{'stack':>6} {'smem KiB':>9} {'LDGSTS':>7} {'HGMMA':>6} {'LDG':>4} {'insts':>6} {'bufs':>4} {'/SM':>3} {'cap':>4}  note")
    for dname in dtypes:
        dtype = getattr(torch, dname)
        for head_dim in head_dims:
            defaults = dict(zip(("fwd", "dkdv", "dq"), K.default_configs(head_dim, dtype)))
            for kname in kinds:
                kind = KINDS.index(kname)
                for name, fn in KERNELS.items():
                    if name == "fwd_flat":  # no default: opt-in candidates (DALLE_FAST_TRITON_FLAT=1)
                        cands = [] if args.defaults_only or dtype == torch.float32 else list(K.FLAT_FWD_CONFIGS)
                    else:
                        cands = [defaults[name]]
                        if not args.defaults_only and dtype != torch.float32:
                            cands += [c for c in K.CANDIDATES[name] if c != defaults[name] and not c.flat]
                    for cfg in cands:
                        try:
                            r = resources(compile_for_hopper(fn, dtype, kind, head_dim, cfg))
                        except Exception as e:  # noqa: BLE001 - report and go on
                            print(f"{name:<8} {kname:<9} {dname:<9} {head_dim:>4} {str(tuple(cfg)):<49} failed: "
                                  f"{type(e).__name__}: {str(e)[:80]}")
                            continue
                        note = "default" if cfg == defaults.get(name) else ""
                        if r["stack"] or r["local"]:
                            note += " SPILLS"
                        if r["wgmma_serialized"]:
                            note += " WGMMA-SERIALIZED"
                        print(f"{name:<8} {kname:<9} {dname:<9} {head_dim:>4} {str(tuple(cfg)):<49} {r['regs']:>5} "
                              f"{r['stack']:>6} {r['smem'] / 1024:>9.1f} {r['ldgsts']:>7} {r['hgmma']:>6} "
                              f"{r['ldg']:>4} {r['instructions']:>6} {r['tile_buffers']:>4} "
                              f"{K.programs_per_sm(r['regs'], cfg.num_warps, r['smem'], K.HOPPER):>3} "
                              f"{K.occupancy_cap(r['regs'], cfg.num_warps, r['smem'], K.HOPPER) or '-':>4}  {note.strip()}")

    hopper_rows(kinds, dtypes, head_dims)


def hopper_rows(kinds, dtypes, head_dims):
    """The hopper path's kernels (forward as launched: TMA + warp specialisation where the kind
    allows; the fused backward, both dQ variants): registers, stack, shared memory, warpgroup MMAs
    and whether Triton split the forward into warpgroups (``ws``, setmaxnreg in the PTX)."""
    why = hopper_ws_supported()
    print(f"\n# hopper path (Triton {triton.__version__}): forward warp specialisation "
          f"{'available' if why is None else 'unavailable: ' + why}")
    print(f"{'kernel':<15} {'kind':<9} {'dtype':<9} {'D':>4} {'config':<22} {'warps':>5} {'ws':>5} {'regs':>5} "
          f"{'stack':>6} {'smem KiB':>9} {'HGMMA':>6} {'LDGSTS':>7}  note")
    for dname in dtypes:
        dtype = getattr(torch, dname)
        if dtype == torch.float32:
            continue
        for head_dim in head_dims:
            for kname in kinds:
                permuted = kname in ("col", "axial_col")
                builds = [("hopper-fwd", lambda: compile_hopper_forward(kname, dtype, head_dim, tma=not permuted,
                                                                 ws=not permuted and why is None),
                           hopper_plan.fwd_config(head_dim, False))]
                for det in (False, True):
                    builds.append((f"hopper-bwd{'-det' if det else ''}",
                                   lambda det=det: compile_hopper_backward(kname, dtype, head_dim, deterministic=det),
                                   hopper_plan.bwd_config(head_dim, False)))
                for name, build, cfg in builds:
                    try:
                        c = build()
                        r = resources(c)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        print(f"{name:<15} {kname:<9} {dname:<9} {head_dim:>4} failed: {type(e).__name__}: {str(e)[:80]}")
                        continue
                    note = "SPILLS" if r["stack"] or r["local"] else ""
                    if r["wgmma_serialized"]:
                        note += " WGMMA-SERIALIZED"
                    shape = f"{cfg.block_m}x{cfg.block_n} s{cfg.num_stages}"
                    print(f"{name:<15} {kname:<9} {dname:<9} {head_dim:>4} {shape:<22} {c.metadata.num_warps:>5} "
                          f"{str(warp_specialized(c)):>5} {r['regs']:>5} {r['stack']:>6} {r['smem'] / 1024:>9.1f} "
                          f"{r['hgmma']:>6} {r['ldgsts']:>7}  {note.strip()}")


if __name__ == "__main__":
    main()
