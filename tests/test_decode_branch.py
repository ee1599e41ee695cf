"""The decode step's branch ops (dalle_fast.ops.branch, csrc/decode_branch_cpu_impl.cpp) against the
same branch composed of torch ops in float64, with PyTorch's own float32 error as the tolerance, on
awkward shapes and every option (token shift at row and column edges, rotary on part or all of a
head, sandwich norm, layer scale, biases, GELU/GEGLU, per-row positions), per instruction set; the
caches and token-shift history they write; argument errors, with nothing written on an error."""
import pytest
import torch
import torch.nn.functional as F

from dalle_fast import Layout, reference
from dalle_fast.ops import LinearPack
from dalle_fast.ops.branch import AttentionBranch, MlpBranch

from conftest import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("every_cpu_isa")

T, S = 5, 4  # text length, image side: image positions T .. T + 15


class _Cache:  # what the branch reads of a dalle_fast.engine.KVCache
    def __init__(self, k, v, text_k, text_v, prompt_index):
        self.k, self.v, self.text_k, self.text_v, self.prompt_index = k, v, text_k, text_v, prompt_index


def _norm(dim, g, affine=True):
    n = torch.nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-5)
    if affine:
        with torch.no_grad():
            n.weight.copy_(1 + 0.3 * torch.randn(dim, generator=g))
            n.bias.copy_(0.2 * torch.randn(dim, generator=g))
    return n


def _ln(x, norm):
    w = None if norm.weight is None else norm.weight.to(x.dtype)
    b = None if norm.bias is None else norm.bias.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), w, b, norm.eps)


def _shift(h, hist, pos, top, left):
    """DALLE-pytorch's image token shift, per row (h (rows, dim), hist written)."""
    out = h.clone()
    for b in range(h.shape[0]):
        m = int(pos[b]) - T
        hist[b, m] = h[b, :top + left]
        out[b, :top] = hist[b, m - S, :top] if m >= S else 0
        out[b, top:top + left] = hist[b, m - 1, top:top + left] if m % S else 0
    return out


def _rotary(t, cos, sin, pos):
    """rotary_embedding_torch's apply_rotary_emb on the first rot features of t (rows, H, D)."""
    rot = cos.shape[1]
    c, s = cos[pos][:, None].to(t.dtype), sin[pos][:, None].to(t.dtype)
    mid = t[..., :rot]
    x = mid.unflatten(-1, (rot // 2, 2))
    swapped = torch.stack((-x[..., 1], x[..., 0]), -1).flatten(-2)  # rotate_half
    return torch.cat((mid * c + swapped * s, t[..., rot:]), -1)


def _ends(y, residual, norm_out, layer_scale):
    if norm_out is not None:
        y = _ln(y, norm_out)
    if layer_scale is not None:
        y = y * layer_scale.to(y.dtype)
    return residual + y


def _tables(N, rot, g):
    freqs = torch.randn(N, rot // 2, generator=g).repeat_interleave(2, -1) * 3
    sign = torch.ones(rot)
    sign[0::2] = -1
    return freqs.cos(), freqs.sin(), freqs.sin() * sign  # cos, sin, sign-folded sin (the op's table)


def _attention_case(rows, dim, heads, D, rot, kind, pos, *, shift, norm_out, layer_scale, bias, seed):
    g = torch.Generator().manual_seed(seed)
    layout = Layout(kind, text_len=T, image_size=S, kernel_size=3)
    P = max(1, rows // 2)
    x, res = torch.randn(rows, 1, dim, generator=g), torch.randn(rows, 1, dim, generator=g)
    w_qkv, w_out = torch.randn(3 * heads * D, dim, generator=g) / dim ** .5, torch.randn(dim, heads * D, generator=g)
    b_qkv = torch.randn(3 * heads * D, generator=g) if bias else None
    b_out = torch.randn(dim, generator=g) if bias else None
    k = torch.randn(rows, heads, S * S, D, generator=g)
    v = torch.randn(rows, heads, S * S, D, generator=g)
    tk, tv = torch.randn(P, heads, T, D, generator=g), torch.randn(P, heads, T, D, generator=g)
    prompt_index = torch.arange(rows) % P
    top, left = dim // 4 + (dim % 4 > 0), dim // 4 + (dim % 4 > 1)  # torch.chunk(dim, 4)'s first two
    hist = torch.randn(rows, S * S, top + left, generator=g)
    cos, sin, sin_signed = _tables(T + S * S, rot, g) if rot else (None, None, None)
    pre, post = _norm(dim, g), _norm(dim, g) if norm_out else None
    scale = (0.1 + torch.rand(dim, generator=g)) if layer_scale else None
    return dict(layout=layout, x=x, res=res, w_qkv=w_qkv, b_qkv=b_qkv, w_out=w_out, b_out=b_out, k=k, v=v, tk=tk,
                tv=tv, prompt_index=prompt_index, top=top, left=left, hist=hist if shift else None, cos=cos, sin=sin,
                sin_signed=sin_signed, pre=pre, post=post, scale=scale, heads=heads, D=D, pos=pos)


def _attention_reference(c, dtype):
    """The branch with torch ops at ``dtype``; returns (out, k cache, v cache, history) it leaves."""
    to = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    rows, H, D = c["x"].shape[0], c["heads"], c["D"]
    pos = c["pos"].expand(rows) if c["pos"].dim() == 0 else c["pos"]
    k, v, hist = to(c["k"]).clone(), to(c["v"]).clone(), None if c["hist"] is None else to(c["hist"]).clone()
    h = _ln(to(c["x"][:, 0]), c["pre"])
    if hist is not None:
        h = _shift(h, hist, pos, c["top"], c["left"])
    q, kn, vn = F.linear(h, to(c["w_qkv"]), to(c["b_qkv"])).view(rows, 3, H, D).unbind(1)
    if c["cos"] is not None:
        q, kn, vn = (_rotary(t, to(c["cos"]), to(c["sin"]), pos) for t in (q, kn, vn))
    att = reference.decode_attention(q[:, :, None], kn[:, :, None], vn[:, :, None], k, v, c["pos"], c["layout"],
                                     1 / D ** .5, to(c["tk"]), to(c["tv"]), c["prompt_index"])
    y = F.linear(att.reshape(rows, H * D), to(c["w_out"]), to(c["b_out"]))
    return _ends(y, to(c["res"][:, 0]), c["post"], to(c["scale"]))[:, None], k, v, hist


def _layer(w, b, packed):
    """The linear layer a branch takes: packed (LinearPack, the per-ISA kernel) or an nn.Linear."""
    if packed:
        return LinearPack(w, b)
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def _attention_op(c, packed=True):
    k, v, hist = c["k"].clone(), c["v"].clone(), None if c["hist"] is None else c["hist"].clone()
    branch = AttentionBranch(
        dim=c["x"].shape[-1], norm=c["pre"], norm_out=c["post"], layer_scale=c["scale"],
        shift=None if hist is None else (hist, c["top"], c["left"]), to_qkv=_layer(c["w_qkv"], c["b_qkv"], packed),
        heads=c["heads"], rotary=None if c["cos"] is None else (c["cos"], c["sin_signed"]),
        cache=_Cache(k, v, c["tk"], c["tv"], c["prompt_index"]), layout=c["layout"],
        to_out=_layer(c["w_out"], c["b_out"], packed))
    return branch(c["x"], c["res"], c["pos"]), k, v, hist


def _check(ours, c, reference_fn, what):
    ref64 = reference_fn(c, torch.float64)
    pt = reference_fn(c, torch.float32)
    for name, o, r, p in zip(("out", "k_cache", "v_cache", "history"), ours, ref64, pt):
        if o is None:
            assert r is None
            continue
        assert o.shape == r.shape and o.dtype == torch.float32, name
        floor = 4 * torch.finfo(torch.float32).eps * max(1.0, r.abs().max().item())
        assert_close_to_reference(o, r, p, f"{what}: {name}", factor=4.0, floor=floor)


CASES = [  # rows, dim, heads, D, rot
    (1, 24, 1, 8, 8),
    (3, 40, 3, 12, 8),
    (5, 33, 2, 16, 0),
    (4, 64, 4, 16, 16),
]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("rows,dim,heads,D,rot", CASES)
@pytest.mark.parametrize("kind", ["full", "axial_row", "axial_col", "conv_like"])
def test_attention_branch_matches_float64(rows, dim, heads, D, rot, kind, packed):
    # image positions: the first, the end of the first image row, a row start, an interior one, the last
    for i, m in enumerate((0, S - 1, S, S + 2, S * S - 1)):
        for shift, norm_out, layer_scale, bias in ((True, True, True, True), (False, False, False, False),
                                                   (True, False, True, False)):
            pos = torch.tensor(T + m)
            if i % 2 and rows > 1:  # rows at different positions
                pos = torch.tensor([T + (m + r) % (S * S) for r in range(rows)])
            c = _attention_case(rows, dim, heads, D, rot, kind, pos, shift=shift, norm_out=norm_out,
                                layer_scale=layer_scale, bias=bias, seed=rows * 1000 + dim + m)
            _check(_attention_op(c, packed), c, _attention_reference,
                   f"{kind} packed={packed} rows={rows} dim={dim} H={heads} D={D} rot={rot} m={m} shift={shift} "
                   f"norm_out={norm_out} scale={layer_scale} bias={bias}")


def _mlp_case(rows, dim, hidden, geglu, pos, *, shift, norm_out, layer_scale, bias, seed):
    g = torch.Generator().manual_seed(seed)
    n1 = 2 * hidden if geglu else hidden
    top, left = dim // 4 + (dim % 4 > 0), dim // 4 + (dim % 4 > 1)
    return dict(x=torch.randn(rows, 1, dim, generator=g), res=torch.randn(rows, 1, dim, generator=g),
                w1=torch.randn(n1, dim, generator=g) / dim ** .5, b1=torch.randn(n1, generator=g) if bias else None,
                w2=torch.randn(dim, hidden, generator=g) / hidden ** .5,
                b2=torch.randn(dim, generator=g) if bias else None, geglu=geglu, top=top, left=left,
                hist=torch.randn(rows, S * S, top + left, generator=g) if shift else None,
                pre=_norm(dim, g, affine=bias), post=_norm(dim, g) if norm_out else None,
                scale=(0.1 + torch.rand(dim, generator=g)) if layer_scale else None, pos=pos)


def _mlp_reference(c, dtype):
    to = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    rows = c["x"].shape[0]
    pos = c["pos"].expand(rows) if c["pos"].dim() == 0 else c["pos"]
    hist = None if c["hist"] is None else to(c["hist"]).clone()
    h = _ln(to(c["x"][:, 0]), c["pre"])
    if hist is not None:
        h = _shift(h, hist, pos, c["top"], c["left"])
    u = F.linear(h, to(c["w1"]), to(c["b1"]))
    if c["geglu"]:
        a, gates = u.chunk(2, -1)
        u = a * F.gelu(gates)
    else:
        u = F.gelu(u)
    y = F.linear(u, to(c["w2"]), to(c["b2"]))
    return _ends(y, to(c["res"][:, 0]), c["post"], to(c["scale"]))[:, None], None, None, hist


def _mlp_op(c, packed=True):
    hist = None if c["hist"] is None else c["hist"].clone()
    branch = MlpBranch(dim=c["x"].shape[-1], norm=c["pre"], norm_out=c["post"], layer_scale=c["scale"],
                       shift=None if hist is None else (hist, c["top"], c["left"]), w1=_layer(c["w1"], c["b1"], packed),
                       w2=_layer(c["w2"], c["b2"], packed), geglu=c["geglu"], text_len=T, image_size=S)
    return branch(c["x"], c["res"], c["pos"]), None, None, hist


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("geglu", [True, False])
@pytest.mark.parametrize("rows,dim,hidden", [(1, 24, 40), (3, 33, 17), (8, 64, 256)])
def test_mlp_branch_matches_float64(rows, dim, hidden, geglu, packed):
    for m in (0, S - 1, S, S * S - 1):
        for shift, norm_out, layer_scale, bias in ((True, True, True, True), (False, False, False, False),
                                                   (True, False, False, True)):
            pos = torch.tensor(T + m) if m % 2 or rows == 1 else torch.tensor([T + (m + r) % (S * S)
                                                                               for r in range(rows)])
            c = _mlp_case(rows, dim, hidden, geglu, pos, shift=shift, norm_out=norm_out, layer_scale=layer_scale,
                          bias=bias, seed=rows * 100 + dim + m)
            _check(_mlp_op(c, packed), c, _mlp_reference,
                   f"packed={packed} rows={rows} dim={dim} hidden={hidden} geglu={geglu} m={m} shift={shift} norm_out={norm_out} "
                   f"scale={layer_scale} bias={bias}")


def _raw_attention_args(c, **change):
    """The op's arguments for case ``c`` (caches and history cloned), with keyword changes."""
    post = c["post"]
    args = dict(x=c["x"], residual=c["res"], norm_weight=c["pre"].weight.detach(), norm_bias=c["pre"].bias.detach(),
                norm_eps=1e-5, norm_out=False, norm_out_weight=None, norm_out_bias=None, norm_out_eps=1e-5,
                layer_scale=None, shift_history=c["hist"].clone(), shift_top=c["top"], shift_left=c["left"],
                qkv_packed=LinearPack(c["w_qkv"]).packed, qkv_bias=None, heads=c["heads"], rotary_cos=c["cos"],
                rotary_sin=c["sin_signed"], k_cache=c["k"].clone(), v_cache=c["v"].clone(), pos=c["pos"],
                text_k_cache=c["tk"], text_v_cache=c["tv"], prompt_index=c["prompt_index"],
                kind=0, text_len=T, image_size=S, kernel_size=3, dilation=1, scale=0.25,
                out_packed=LinearPack(c["w_out"]).packed, out_bias=None)
    assert post is None
    args.update(change)
    return args


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(3, 1, 40, dtype=torch.float64)), "x must be a float32"),
    (dict(residual=torch.zeros(2, 1, 40)), "residual must be"),
    (dict(norm_weight=torch.ones(7)), "norm_weight must be"),
    (dict(norm_eps=-1.0), "norm_eps must be"),
    (dict(layer_scale=torch.ones(39)), "layer_scale must be"),
    (dict(shift_history=torch.zeros(3, 15, 20)), "shift_history must be"),
    (dict(shift_top=30, shift_left=20), "shift_top and shift_left"),
    (dict(heads=2), "heads must be"),
    (dict(qkv_packed=torch.zeros(3, 40, 16)), "qkv_packed must be"),
    (dict(qkv_packed=torch.zeros(108, 41)), "qkv_packed must be a float32 CPU weight"),
    (dict(out_packed=torch.zeros(40, 36, dtype=torch.float64)), "out_packed must be a float32 CPU weight"),
    (dict(qkv_bias=torch.zeros(5)), "qkv_bias must be"),
    (dict(out_packed=torch.zeros(3, 40, 16)), "out_packed must be"),
    (dict(rotary_sin=None), "rotary_cos and rotary_sin go together"),
    (dict(rotary_cos=torch.zeros(T + S * S, 14), rotary_sin=torch.zeros(T + S * S, 14)), "rotary_cos must be"),
    (dict(rotary_cos=torch.zeros(T + 3, 8), rotary_sin=torch.zeros(T + 3, 8)), "rotary_cos has"),
    (dict(pos=torch.tensor(T - 1)), "pos must be an image position"),
    (dict(pos=torch.tensor(T + S * S)), "pos must be an image position"),
    (dict(pos=torch.tensor([T, T])), "pos must be a 0-dim or"),
    (dict(prompt_index=torch.tensor([0, 5, 0])), "prompt_index"),
    (dict(text_k_cache=None), "go together"),
    (dict(scale=float("nan")), "scale"),
])
def test_attention_branch_bad_arguments_raise_and_write_nothing(change, match):
    c = _attention_case(3, 40, 3, 12, 8, "full", torch.tensor(T + S + 1), shift=True, norm_out=False,
                        layer_scale=False, bias=False, seed=7)
    args = _raw_attention_args(c, **change)
    before = {n: args[n].clone() for n in ("shift_history", "k_cache", "v_cache")
              if isinstance(args[n], torch.Tensor)}
    with pytest.raises(ValueError, match=match):
        torch.ops.dalle_fast.decode_attention_branch(**args)
    for n, t in before.items():
        assert torch.equal(args[n], t), f"{n} was written by a call that raised"


@pytest.mark.parametrize("change,match", [
    (dict(hidden=0), "hidden must be"),
    (dict(w1_packed=torch.zeros(2, 40, 16)), "w1_packed must be"),
    (dict(w2_packed=torch.zeros(2, 30, 16)), "w2_packed must be"),
    (dict(pos=torch.tensor(2)), "pos must be an image position"),
    (dict(shift_history=torch.zeros(4, S * S, 20)), "shift_history must be"),
    (dict(b2=torch.zeros(3)), "b2 must be"),
])
def test_mlp_branch_bad_arguments_raise_and_write_nothing(change, match):
    c = _mlp_case(3, 40, 24, True, torch.tensor(T + 3), shift=True, norm_out=False, layer_scale=False, bias=True,
                  seed=3)
    args = dict(x=c["x"], residual=c["res"], norm_weight=c["pre"].weight.detach(), norm_bias=c["pre"].bias.detach(),
                norm_eps=1e-5, norm_out=False, norm_out_weight=None, norm_out_bias=None, norm_out_eps=1e-5,
                layer_scale=None, shift_history=c["hist"].clone(), shift_top=c["top"], shift_left=c["left"],
                pos=c["pos"], text_len=T, image_size=S, w1_packed=LinearPack(c["w1"]).packed, b1=c["b1"], hidden=24,
                geglu=True, w2_packed=LinearPack(c["w2"]).packed, b2=c["b2"])
    args.update(change)
    before = args["shift_history"].clone()
    with pytest.raises(ValueError, match=match):
        torch.ops.dalle_fast.decode_mlp_branch(**args)
    assert torch.equal(args["shift_history"], before)


def test_branch_construction_refuses_other_norms():
    pack = LinearPack(torch.randn(24, 8))
    with pytest.raises(ValueError, match="nn.LayerNorm"):
        MlpBranch(dim=8, norm=torch.nn.RMSNorm(8), w1=pack, w2=LinearPack(torch.randn(8, 12)), geglu=True,
                  text_len=T, image_size=S)
    with pytest.raises(ValueError, match="w2 must be a LinearPack or an nn.Linear"):
        MlpBranch(dim=8, norm=torch.nn.LayerNorm(8), w1=pack, w2=torch.randn(8, 12), geglu=True, text_len=T,
                  image_size=S)
    with pytest.raises(ValueError, match="3 x heads"):
        AttentionBranch(dim=8, norm=torch.nn.LayerNorm(8), to_qkv=LinearPack(torch.randn(25, 8)), heads=2,
                        cache=None, layout=Layout("full", text_len=T, image_size=S),
                        to_out=LinearPack(torch.randn(8, 8)))


def test_opcheck():
    """Schemas (the in-place writes declared), fake kernels and dispatch of both ops."""
    c = _attention_case(3, 40, 3, 12, 8, "full", torch.tensor(T + S + 1), shift=True, norm_out=False,
                        layer_scale=False, bias=False, seed=11)
    torch.library.opcheck(torch.ops.dalle_fast.decode_attention_branch.default,
                          tuple(_raw_attention_args(c).values()))
    m = _mlp_case(3, 40, 24, True, torch.tensor(T + 3), shift=True, norm_out=False, layer_scale=False, bias=True,
                  seed=12)
    torch.library.opcheck(torch.ops.dalle_fast.decode_mlp_branch.default,
                          (m["x"], m["res"], m["pre"].weight.detach(), m["pre"].bias.detach(), 1e-5, False, None, None,
                           1e-5, None, m["hist"].clone(), m["top"], m["left"], m["pos"], T, S,
                           LinearPack(m["w1"]).packed, m["b1"], 24, True, LinearPack(m["w2"]).packed, m["b2"]))
