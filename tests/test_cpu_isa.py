"""Run-time instruction-set dispatch of the CPU kernels: the choice, its switches and errors, the
paths' agreement, and a build that runs on any CPU of its architecture."""

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import dalle_fast
from dalle_fast import Layout

X86 = platform.machine().lower() in ("x86_64", "amd64")
KNOWN = ("default", "avx2", "avx512") if X86 else ("default",)


def _python(code, **env):
    """Runs code in a fresh interpreter (the ISA is chosen once per process) with env added."""
    full = {k: v for k, v in os.environ.items() if k != "DALLE_FAST_CPU_ISA"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_default_is_the_best_the_cpu_runs():
    isas = dalle_fast.available_cpu_isas()
    assert isas[0] == "default" and set(isas) <= set(KNOWN) and list(isas) == [i for i in KNOWN if i in isas]
    r = _python("import dalle_fast; print(dalle_fast.cpu_isa())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == isas[-1]


@pytest.mark.parametrize("isa", KNOWN)
def test_environment_variable_forces_an_isa(isa):
    r = _python("import dalle_fast; print(dalle_fast.cpu_isa())", DALLE_FAST_CPU_ISA=isa)
    if isa in dalle_fast.available_cpu_isas():
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == isa
    else:  # a CPU without it: a clear error, not a crash
        assert r.returncode == 1 and f"this CPU cannot run the '{isa}' kernels" in r.stderr


def test_unknown_isa_in_the_environment_is_a_clear_error_at_the_first_kernel_call():
    code = ("import torch, dalle_fast\nl = dalle_fast.Layout('row', 4, 2)\nq = torch.randn(1, 1, l.seq_len, 8)\n"
            "dalle_fast.sparse_attention(q, q, q, l)")
    r = _python(code, DALLE_FAST_CPU_ISA="sse9")
    assert r.returncode == 1
    assert "$DALLE_FAST_CPU_ISA: unknown instruction set 'sse9'" in r.stderr


def test_set_and_use_cpu_isa():
    before = dalle_fast.cpu_isa()
    for isa in dalle_fast.available_cpu_isas():
        with dalle_fast.use_cpu_isa(isa):
            assert dalle_fast.cpu_isa() == isa
        assert dalle_fast.cpu_isa() == before
    with pytest.raises(ValueError, match="isa: unknown instruction set 'neon9'"):
        dalle_fast.set_cpu_isa("neon9")
    with pytest.raises(TypeError, match="isa must be a str"):
        dalle_fast.set_cpu_isa(2)
    assert dalle_fast.cpu_isa() == before


def _run_all_kernels():
    """Forward, backward, decode and sampling outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    layout = Layout("conv", 16, 6, kernel_size=3)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 40, generator=g, requires_grad=True) for _ in range(3))
    out = dalle_fast.sparse_attention(q, k, v, layout, backend="cpu")
    out.backward(torch.randn(out.shape, generator=g))
    results = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    kc, vc = (torch.randn(2, 3, layout.seq_len, 40, generator=g) for _ in range(2))
    qn, kn, vn = (torch.randn(2, 3, 1, 40, generator=g) for _ in range(3))
    pos = torch.tensor([20, 51])
    results["decode"] = dalle_fast.decode_attention(qn, kn, vn, kc, vc, pos, layout, backend="cpu")
    logits = torch.randn(16, 1000, generator=g) * 3
    seeds = torch.arange(16)
    results["sample"] = dalle_fast.sample(logits, seeds=seeds, step=7, temperature=0.9, top_k=50, top_p=0.9, backend="cpu")
    return results


def test_isa_paths_agree():
    """Every path gives the same tokens and, within float32 rounding, the same attention."""
    runs = {}
    for isa in dalle_fast.available_cpu_isas():
        with dalle_fast.use_cpu_isa(isa):
            runs[isa] = _run_all_kernels()
    base = runs["default"]
    for isa, r in runs.items():
        assert torch.equal(r["sample"], base["sample"]), isa
        for name in ("out", "dq", "dk", "dv", "decode"):
            torch.testing.assert_close(r[name], base[name], rtol=1e-5, atol=1e-5, msg=f"{isa} {name}")


# x86-64 instructions beyond the baseline (SSE2): VEX/EVEX (AVX, AVX2, FMA, F16C, AVX-512), their
# registers, and BMI1/BMI2/LZCNT (tzcnt is left out: it runs as bsf on older CPUs)
_BEYOND_BASELINE = re.compile(
    r"\t(v(?!err|erw)[a-z0-9]+|andn|bextr|blsi|blsr|blsmsk|bzhi|mulx|pdep|pext|rorx|sarx|shlx|shrx|lzcnt)\b"
    r"|%[yz]mm|%k[0-7]\b")


@pytest.mark.skipif(not X86, reason="checks x86-64 machine code")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_only_the_isa_kernels_use_instructions_beyond_the_baseline():
    """The library runs on any x86-64 CPU: AVX/AVX-512 instructions appear only in functions of the
    AVX2 and AVX512 kernel copies, which run after the CPU check. An inline function emitted by
    several copies (a standard-library template, say) must resolve to the baseline one."""
    path = dalle_fast._C.__file__
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                             check=True).stdout
    offenders, checked, func = {}, 0, None
    for line in listing.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            func = m.group(1)
            checked += 1
            continue
        # mangled names hold the namespace as <length><name>
        if func is None or "4AVX2" in func or "6AVX512" in func:
            continue
        hit = _BEYOND_BASELINE.search(line)
        if hit:
            offenders.setdefault(func, line.strip())
    assert checked > 100
    assert not offenders, "\n".join(f"{f}: {i}" for f, i in list(offenders.items())[:20])
