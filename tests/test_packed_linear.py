"""The decode step's packed linear layer (dalle_fast.ops.LinearPack, csrc/cpu/linear.cpp) against a
float64 reference on awkward shapes, per instruction set; the pack's layout, argument errors,
opcheck, and the models' decode steps with and without packs."""
import pytest
import torch
import torch.nn.functional as F

import dalle_fast
from dalle_fast.ops import LinearPack

from conftest import assert_close_to_reference, max_err

pytestmark = pytest.mark.usefixtures("every_cpu_isa")

op = torch.ops.dalle_fast
KS = (1, 7, 128, 129, 300)         # one k chunk (128), a chunk and one more, several
NS = (1, 8, 15, 16, 17, 33, 100)   # within a vector, a panel, past a panel, odd panel counts


def _check(x, w, b, what):
    ours = LinearPack(w, b)(x)
    ref64 = F.linear(x.double(), w.double(), None if b is None else b.double())
    pt = F.linear(x, w, b)
    floor = 2 * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert ours.shape == pt.shape and ours.dtype == torch.float32
    assert_close_to_reference(ours, ref64, pt, what, factor=2.0, floor=floor)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M", [1, 5, 8, 9, 17])
def test_matches_float64_reference(M, bias):
    g = torch.Generator().manual_seed(1000 * M + bias)
    for K in KS:
        for N in NS:
            x = torch.randn(M, K, generator=g)
            w = torch.randn(N, K, generator=g)
            b = torch.randn(N, generator=g) if bias else None
            _check(x, w, b, f"M={M} K={K} N={N} bias={bias}")


def test_input_layouts():
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    base = torch.randn(3, 5, 48, generator=g)
    for what, x in (("3-D", base[..., :24]), ("strided features", base[..., ::2]),
                    ("transposed rows", base.transpose(0, 1)[..., 1:25]), ("one row", base[0, 0, :24])):
        _check(x, w, b, what)
    out = LinearPack(w, b)(torch.empty(0, 24))
    assert out.shape == (0, 40)


def test_pack_layout():
    w = torch.randn(37, 5)
    p = op.pack_linear_weight(w)
    assert p.shape == (3, 5, 16) and p.is_contiguous()
    for n in range(48):
        col = p[n // 16, :, n % 16]
        assert torch.equal(col, w[n] if n < 37 else torch.zeros(5)), n


def test_module_and_serves():
    lin = torch.nn.Linear(33, 70)
    x = torch.randn(6, 33)
    assert max_err(LinearPack.of(lin)(x), lin(x)) < 1e-5
    # the baseline build's kernel is correct (tested above) but slower than torch's GEMM: not used
    assert LinearPack.serves(torch.device("cpu"), torch.float32) == (dalle_fast.cpu_isa() in ("avx2", "avx512"))
    assert not LinearPack.serves(torch.device("cpu"), torch.bfloat16)
    assert not LinearPack.serves(torch.device("meta"), torch.float32)


@pytest.mark.parametrize("call, match", [
    (lambda p, x, b: op.packed_linear(x.double(), p, b, 20), "x must be float32"),
    (lambda p, x, b: op.packed_linear(x[:, :5], p, b, 20), r"x must be \(\.\.\., in_features = 6\)"),
    (lambda p, x, b: op.packed_linear(x, p[:, :, :8].contiguous(), b, 20), "packed must be a contiguous"),
    (lambda p, x, b: op.packed_linear(x, p.transpose(0, 1), b, 20), "packed must be a contiguous"),
    (lambda p, x, b: op.packed_linear(x, p, b, 33), r"out_features must be in \(16, 32\]"),
    (lambda p, x, b: op.packed_linear(x, p, b, 0), "out_features must be"),
    (lambda p, x, b: op.packed_linear(x, p, b[:5], 20), r"bias must be a float32 CPU tensor of shape \(20\)"),
    (lambda p, x, b: op.packed_linear(x, p, b.double(), 20), "bias must be"),
    (lambda p, x, b: op.pack_linear_weight(torch.randn(3, 4, 5)), "weight must be \\(out_features, in_features\\)"),
    (lambda p, x, b: op.pack_linear_weight(torch.randn(0, 4)), "weight must be"),
    (lambda p, x, b: op.pack_linear_weight(torch.randn(3, 4).half()), "weight must be float32"),
])
def test_errors_name_the_argument(call, match):
    p, x, b = op.pack_linear_weight(torch.randn(20, 6)), torch.randn(4, 6), torch.randn(20)
    with pytest.raises(ValueError, match=match):
        call(p, x, b)


def test_opcheck():
    w, b = torch.randn(20, 6), torch.randn(20)
    torch.library.opcheck(op.pack_linear_weight.default, (w,))
    p = op.pack_linear_weight(w)
    torch.library.opcheck(op.packed_linear.default, (torch.randn(3, 6), p, b, 20))
    torch.library.opcheck(op.packed_linear.default, (torch.randn(2, 3, 6), p, None, 20))


def _decode_logits(model, text, packed: bool):
    """Image logits of the prefill and three decode steps, the steps with or without packs."""
    rows = 3
    model.setup_caches(torch.zeros(rows, dtype=torch.int64))
    assert model.packs is not None
    model.branches = None  # the modules' path (the branch ops have their own tests)
    if not packed:
        model.packs = None
    out = [model.prefill(text).expand(rows, -1)]
    T = model.config.text_len
    for j in range(3):
        tokens = out[-1].argmax(-1)
        out.append(model.decode_step(tokens, torch.tensor(T + j), T + j))
    model.clear_caches()
    return torch.stack(out)


def test_native_decode_step_with_packs():
    from dalle_fast.models.dalle import DALLE, DALLEConfig
    if not LinearPack.serves(torch.device("cpu"), torch.float32):
        pytest.skip("the decode step packs its linear layers with the AVX2 / AVX-512 kernels only")
    torch.manual_seed(0)
    model = DALLE(DALLEConfig.preset("tiny")).eval()
    text = torch.randint(0, model.config.text_vocab, (1, model.config.text_len - 1))
    with torch.no_grad():
        ours, plain = _decode_logits(model, text, True), _decode_logits(model, text, False)
    assert model.packs is None
    assert max_err(ours, plain) <= 1e-5 * plain.abs().max().item()


def test_pack_module_runs_sequentials_with_packed_linears():
    from dalle_fast.ops import pack_module
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.GELU(), torch.nn.Dropout(0.0), torch.nn.Linear(40, 7))
    x = torch.randn(5, 12)
    packed = pack_module(net)
    assert [type(p).__name__ for p in packed.parts] == ["LinearPack", "GELU", "Dropout", "LinearPack"]
    assert max_err(packed(x), net(x)) <= 1e-5
    net.eval()  # dropout is the identity then, and left out
    packed = pack_module(net)
    assert [type(p).__name__ for p in packed.parts] == ["LinearPack", "GELU", "LinearPack"]
    assert max_err(packed(x), net(x)) <= 1e-5
    assert isinstance(pack_module(net[0]), LinearPack)
    with pytest.raises(ValueError, match="module must be an nn.Linear or nn.Sequential, got GELU"):
        pack_module(torch.nn.GELU())
