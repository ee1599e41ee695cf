"""Static resources of the Triton attention kernels compiled for Hopper (sm_90a), without a GPU.

``compile_for_hopper`` compiles one kernel for one tile configuration as Triton's JIT would
specialise it at a problem (16-byte aligned pointers, strides divisible by 16), and ``resources``
reads the cubin back with the ``cuobjdump`` / ``nvdisasm`` that Triton ships: registers per
thread, stack bytes (register spills), shared memory, and counts of the SASS instructions that show
how data moves (``LDGSTS`` asynchronous global -> shared copies, ``HGMMA`` warpgroup MMAs, plain
``LDG`` / ``STG``), and from the TTGIR how deep the software pipeline buffers the streamed tiles
(``tile_buffers``: the shallowest multi-buffered shared-memory tile, ``num_stages`` when every
tile load is prefetched ``num_stages - 1`` iterations ahead). Used by ``bench/kernel_resources.py``
and by the tests, which hold the default configurations to no spills, full-depth buffers and
unserialized warpgroup MMAs (ptxas's own report on the PTX). Needs
a real (not interpreted) Triton: import it without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..masks import KINDS
from . import hopper as Kh
from . import hopper_plan
from . import sparse_attention as K

__all__ = ["KERNELS", "compile_for_hopper", "compile_hopper_backward", "compile_hopper_forward", "hopper_ws_supported", "resources", "tool",
           "warp_specialized"]

TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
FLOAT_PTRS = ("LSE", "DELTA", "DLSE")
INT_PTRS = ("PERM", "TAB", "WORK")
FLOATS = ("qk_scale", "sm_scale")
KERNELS = {name: K.KERNELS[name] for name in ("fwd", "dkdv", "dq", "fwd_flat")}  # the portable kernels, listing order


def tool(name: str) -> str:
    """Path of a binary Triton ships for NVIDIA (cuobjdump, nvdisasm)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this Triton does not ship {name}")
    return str(path)


def compile_for_hopper(fn, dtype, kind, head_dim, cfg, *, heads=16, seq=1280, text_len=256, image_size=32):
    """sm_90a compilation of kernel ``fn`` as the JIT would specialise it at this problem."""
    consts = dict(KIND=kind, PERMUTED=KINDS[kind] in ("col", "axial_col"), HEAD_DIM=head_dim,
                  IEEE=dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    if "HAS_DLSE" in fn.arg_names:  # dQ: without the lse gradient, as in training
        consts["HAS_DLSE"] = False
    ints = dict(H=heads, N=seq, T=text_len, S=image_size, KS=3, DIL=1)
    unspecialized = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name == "FLAGS":
            sig[name] = "*i8"
        elif name in FLOAT_PTRS or name in INT_PTRS:
            sig[name] = "*fp32" if name in FLOAT_PTRS else "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name.isupper() and name not in ints and name not in unspecialized:  # Q, K, V, O, DO, DQ, DK, DV
            sig[name] = TYPES[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # strides (all multiples of 16 at the benchmark's shape), layout sizes, table offsets
            sig[name] = "i32"
            value = ints.get(name, 16 * head_dim)
            if value % 16 == 0 and name not in unspecialized:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=K.compile_options(cfg))


def hopper_ws_supported():
    """None if this Triton can warp-specialise a loop (``tl.range(warp_specialize=...)``) and has
    TMA tensor descriptors, else why not."""
    import inspect

    import triton.language as tl

    if "warp_specialize" not in inspect.signature(tl.range.__init__).parameters:
        return f"Triton {triton.__version__} has no automatic warp specialisation"
    if hopper_plan.TensorDescriptor is None:
        return f"Triton {triton.__version__} has no TMA tensor descriptors"
    return None


def compile_hopper_forward(kind, dtype=torch.bfloat16, head_dim=64, *, tma=True, ws=True, config=None):
    """sm_90a compilation of the hopper forward (:func:`hopper._fwd_hopper`) for ``kind`` (name or id),
    specialised as the JIT would at the benchmark's shape (16-byte aligned pointers and strides), with
    4-D TMA descriptors (``tma``) and warp specialisation (``ws``)."""
    kind_id = KINDS.index(kind) if isinstance(kind, str) else kind
    cfg = config or hopper_plan.fwd_config(head_dim, False)
    fn = Kh._fwd_hopper
    consts = dict(KIND=kind_id, PERMUTED=KINDS[kind_id] in ("col", "axial_col"), TMA=tma, WS=ws, SAFE=False,
                  FIXUP=False, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  IEEE=dtype == torch.float32)
    elem = TYPES[dtype][1:]
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.startswith("desc_"):
            rows = cfg.block_m // 2 if name == "desc_q" else cfg.block_n
            sig[name] = f"tensordesc<{elem}[1,1,{rows},{head_dim}]>" if tma else TYPES[dtype]
        elif name in ("Q", "K", "V", "O"):
            sig[name], attrs[(i,)] = TYPES[dtype], [["tt.divisibility", 16]]
        elif name == "LSE":
            sig[name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif name in ("PERM", "SEG", "ORDER"):
            sig[name], attrs[(i,)] = "*i32", [["tt.divisibility", 16]]
        elif name == "FLAGS":
            sig[name] = "*i8"
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif name == "DIL":  # 1 except for conv_like, specialised by the JIT like any int equal to 1
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if name.startswith("s_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    warps = cfg.num_warps if ws else 2 * cfg.num_warps  # as hopper_plan.forward launches it
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=cfg.num_stages))


def compile_hopper_backward(kind, dtype=torch.bfloat16, head_dim=64, *, deterministic=False, config=None):
    """sm_90a compilation of the hopper backward (:func:`hopper._bwd_fused`) for ``kind``, as
    :func:`compile_hopper_forward` does for the forward."""
    kind_id = KINDS.index(kind) if isinstance(kind, str) else kind
    cfg = config or hopper_plan.bwd_config(head_dim, False)
    fn = Kh._bwd_fused
    consts = dict(KIND=kind_id, PERMUTED=KINDS[kind_id] in ("col", "axial_col"), DETERMINISTIC=deterministic, FIXUP=False,
                  HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IEEE=dtype == torch.float32, DIL=1)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "DO", "DK", "DV", "DQ"):
            sig[name], attrs[(i,)] = TYPES[dtype], [["tt.divisibility", 16]]
        elif name in ("LSE", "DELTA", "DQ_ACC"):
            sig[name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif name == "DQFLAGS":
            sig[name] = "*i8"
        elif name in ("PERM", "KSEG", "KORDER", "QSEG", "QORDER"):
            sig[name], attrs[(i,)] = "*i32", [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("s_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps,
                                                                             num_stages=cfg.num_stages))


def warp_specialized(compiled) -> bool:
    """Whether Triton split the kernel into warpgroups with their own register budgets (``setmaxnreg``)."""
    return "setmaxnreg" in compiled.asm["ptx"]


_TILE_BUFFER = re.compile(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x(\d+)x(\d+)x")
_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T] )?([A-Z0-9_]+)(?:\.[A-Z0-9_.]+)?")


def resources(compiled) -> dict:
    """Registers, stack bytes, shared memory, SASS opcode counts, the shallowest pipeline buffer of
    2-D tiles (``tile_buffers``, 0 if none) and whether ptxas serialized its warpgroup MMAs
    (``wgmma_serialized``) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
        ptx = Path(d) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        # ptxas reports (C7514/C7515) when it has to serialize the warpgroup MMAs: each wgmma then
        # waits for the previous one, whatever Triton's pipelining asked for
        ptxas_log = subprocess.run([tool("ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(d) / "re.cubin")],
                                   capture_output=True, text=True).stderr
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output: {usage[-500:]}")
    ops = collections.Counter(_OP.findall(sass))
    depths = [int(d) for d, _, _ in _TILE_BUFFER.findall(compiled.asm["ttgir"])]
    return dict(regs=int(m[1]), stack=int(m[2]), local=int(m[4]), smem=int(compiled.metadata.shared),
                ldgsts=ops["LDGSTS"], hgmma=ops["HGMMA"], ldg=ops["LDG"], stg=ops["STG"],
                instructions=sum(ops.values()), tile_buffers=min(depths) if depths else 0,
                wgmma_serialized="wgmma.mma_async instructions are serialized" in ptxas_log)
