"""dalle_fast.integrations.dalle_pytorch against the real DALLE-pytorch package (dalle-pytorch 1.6.6).

DALLE-pytorch is installed without its dependency tree (requirements-dalle-pytorch.txt). Its import
pulls modules that only its VQGAN/VAE-download paths use (``taming``, ``omegaconf``) and
``pkg_resources``; ``import_dalle_pytorch(stand_ins=True)`` stands in for them when missing. The
tests skip when the package itself cannot be imported.
"""
import copy
import sys
import types

import pytest
import torch

from conftest import assert_close_to_reference

import dalle_fast.integrations.dalle_pytorch as dfp
from dalle_fast import Layout

try:
    dalle_pytorch = dfp.import_dalle_pytorch(stand_ins=True)
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"dalle-pytorch cannot be imported ({e}); pip install --no-deps -r requirements-dalle-pytorch.txt",
                allow_module_level=True)
dp_attention, dp_transformer = dalle_pytorch.attention, dalle_pytorch.transformer

TEXT_LEN = 6      # text_seq_len (T = 7 with <bos>)
S = 4             # 16x16 images, 2 VAE layers -> 4x4 tokens
MIX = ("full", "axial_row", "axial_col", "conv_like")


def make_model(seed=0, depth=4, image_size=16, text_seq_len=TEXT_LEN, dim=32, heads=2, dim_head=16, **kw):
    """A small DALLE with random weights whose layers matter (LayerScale ~1 instead of 0.1); images of
    ``image_size`` pixels are ``image_size / 4`` tokens a side (S = 4 by default)."""
    torch.manual_seed(seed)
    vae = dalle_pytorch.DiscreteVAE(image_size=image_size, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)
    kw.setdefault("attn_types", MIX)
    model = dalle_pytorch.DALLE(dim=dim, vae=vae, num_text_tokens=50, text_seq_len=text_seq_len, depth=depth,
                                heads=heads, dim_head=dim_head, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, dp_transformer.LayerScale):
                m.scale.uniform_(0.5, 1.5)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        if not kw.get("share_input_output_emb"):  # (tied: the image embeddings would grow too)
            model.to_logits[1].weight.mul_(4)  # spread the logits: fewer near-ties in greedy decoding
    return model.eval()


def batch(b=2, seed=1, text_len=TEXT_LEN, image_tokens=S * S):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 44, (b, text_len), generator=g)
    text[0, 4:] = 0  # padding
    image = torch.randint(0, 32, (b, image_tokens), generator=g)
    return text, image


# ---------------------------------------------------------------------------------------------
# masks: what the package's modules attend to == the Layout kinds
# ---------------------------------------------------------------------------------------------
def effective_mask(module, n, T):
    """``(n, n)`` bool: which keys each query of a DALLE-pytorch attention module attends to.

    One float64 forward with one head, identity value and output projections and input ``x = I``:
    output row ``i`` is then query ``i``'s attention row (softmax weights are > 0 exactly where allowed;
    random q/k weights are small enough that nothing underflows). Rotary embeddings are the identity.
    """
    module = copy.deepcopy(module).double()
    dim = module.to_out[0].in_features
    with torch.no_grad():
        qk = module.to_qkv.weight[:2 * dim]
        qk.copy_(torch.randn_like(qk) * 0.1)
        module.to_qkv.weight[2 * dim:] = torch.eye(dim)
        module.to_out[0].weight.copy_(torch.eye(dim))
        module.to_out[0].bias.zero_()
        identity_rotary = torch.zeros(1, T + S * S, 2, dtype=torch.float64)  # cos 1, sin 0
        out = module(torch.eye(dim, dtype=torch.float64)[None, :n], rotary_pos_emb=identity_rotary)
    return out[0, :, :n] != 0


@pytest.mark.parametrize("T", [1, 7])
def test_masks_match_dalle_pytorch_modules(T):
    torch.manual_seed(0)
    seq_len = T - 1 + S * S
    common = dict(heads=1, dim_head=seq_len)
    dim = seq_len
    cases = [
        (dp_attention.SparseAxialCausalAttention(dim, seq_len, image_size=S, axis=0, **common), Layout("axial_row", T, S)),
        (dp_attention.SparseAxialCausalAttention(dim, seq_len, image_size=S, axis=1, **common), Layout("axial_col", T, S)),
        (dp_attention.Attention(dim, seq_len, **common), Layout("full", T, S)),
    ]
    for k, d in ((5, 1), (3, 1), (3, 2), (1, 1)):
        cases.append((dp_attention.SparseConvCausalAttention(dim, seq_len, image_size=S, kernel_size=k, dilation=d,
                                                             **common), Layout("conv_like", T, S, k, d)))
    tr = dp_transformer.Transformer(dim=dim, depth=1, seq_len=seq_len, image_fmap_size=S, rotary_emb=False, **common)
    for kind in ("axial_row", "axial_col"):  # optimize_for_inference's static masks
        static = tr._get_attention_mask(kind)
        cases.append((dp_attention.Attention(dim, seq_len, static_mask=static, **common), Layout(kind, T, S)))
    for module, layout in cases:
        for n in (seq_len, seq_len - 3, T):
            got = effective_mask(module, n, T)
            assert torch.equal(got, layout.dense_mask(n)), (layout, n, (got != layout.dense_mask(n)).nonzero().tolist())


def test_layouts_of_a_model():
    model = make_model(depth=5, optimize_for_inference=False)
    assert [(l.kind, l.text_len, l.image_size, l.kernel_size) for l in dfp.layouts(model)] == [
        ("full", 7, S, 11), ("axial_row", 7, S, 11), ("axial_col", 7, S, 11), ("conv_like", 7, S, 5), ("full", 7, S, 11)]
    fast = make_model(depth=3, attn_types=("axial_row", "axial_col", "full"), optimize_for_inference=True)
    assert [l.kind for l in dfp.layouts(fast)] == ["axial_row", "axial_col", "full"]


# ---------------------------------------------------------------------------------------------
# forward, loss and gradients
# ---------------------------------------------------------------------------------------------
CONFIGS = {
    "full": dict(attn_types=("full",)),
    "axial_row": dict(attn_types=("axial_row",)),
    "axial_col": dict(attn_types=("axial_col",)),
    "conv_like": dict(attn_types=("conv_like",)),
    "mix": dict(),
    "mix_stable_sandwich": dict(stable=True, sandwich_norm=True),
    "mix_no_shift": dict(shift_tokens=False),
    "optimize_for_inference": dict(attn_types=("axial_row", "axial_col", "full"), optimize_for_inference=True),
    "shared_input_output_emb": dict(share_input_output_emb=True),
    # one module in several layers (each layer keeps its own wrappers, token shift and KV cache)
    "shared_layers": dict(attn_types=("full", "axial_row"), shared_attn_ids=(0, 1, 0, 1), shared_ff_ids=(0, 0, 1, 1)),
    "shared_sparse_layers": dict(attn_types=("conv_like", "axial_col"), shared_attn_ids=(0, 1, 0, 1),
                                 shared_ff_ids=(0, 0, 0, 0)),
    # y1 = x1 + f(x2), y2 = x2 + g(y1) on two copies of the input, their mean at the end
    "reversible": dict(reversible=True),
}


def close(ours, ref64, ref_pt, what):
    """Error vs the float64 model at most 2x DALLE-pytorch's own float32 error, plus 8 float32 ulps of
    the values' scale (a scalar loss can land unusually close by chance)."""
    floor = 8 * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert_close_to_reference(ours, ref64, ref_pt, what, floor=floor)


def loss_and_grads(model, text, image):
    model.zero_grad()
    loss = model(text.clone(), image, return_loss=True)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_loss_and_gradients_match(name):
    model = make_model(**CONFIGS[name])
    ref64 = copy.deepcopy(model).double()
    text, image = batch()
    with torch.no_grad():
        logits_pt, logits64 = model(text.clone(), image), ref64(text.clone(), image)
    if CONFIGS[name].get("reversible"):
        # DALLE-pytorch's reversible backward restores the RNG state its forward records in training
        # mode only (in eval it fails: set_rng_state(None)); without dropout, training is deterministic
        model.train(), ref64.train()
    loss_pt, grads_pt = loss_and_grads(model, text, image)
    loss64, grads64 = loss_and_grads(ref64, text, image)
    dfp.patch(model)
    with torch.no_grad():
        logits = model(text.clone(), image)
    loss, grads = loss_and_grads(model, text, image)
    # logits at masked (text <-> image) entries are -finfo.max in both; compare the rest
    keep = ~model.logits_mask[:, :logits.shape[1]].expand_as(logits)
    close(logits[keep], logits64[keep], logits_pt[keep], f"{name} logits")
    close(loss, loss64, loss_pt, f"{name} loss")
    close(grads, grads64, grads_pt, f"{name} gradients")


def seeded(seed, fn, *args):
    torch.manual_seed(seed)
    return fn(*args)


@pytest.mark.parametrize("kind", ["full", "axial_row", "axial_col", "conv_like"])
def test_attention_dropout_in_training_draws_what_dalle_pytorch_draws(kind):
    """attn_dropout (DALLE-pytorch 1.6.6: an nn.Dropout after the attention's output projection) in
    training mode: with the same seed the patched model zeroes the same entries, so logits, loss and
    gradients match the unpatched model's (and the float64 model's, whose draws are the same). The
    axial and conv modules project a sequence padded to seq_len + 1 and drop from that; the patched
    ones drew a mask for the unpadded shape, so every row after the first batch item differed."""
    model = make_model(depth=2, attn_types=(kind,), attn_dropout=0.5).train()
    ref64 = copy.deepcopy(model).double()
    text, image = batch()
    with torch.no_grad():
        eval_logits = copy.deepcopy(model).eval()(text.clone(), image)
        logits_pt, logits64 = seeded(3, model, text.clone(), image), seeded(3, ref64, text.clone(), image)
    loss_pt, grads_pt = seeded(4, loss_and_grads, model, text, image)
    loss64, grads64 = seeded(4, loss_and_grads, ref64, text, image)
    dfp.patch(model)
    with torch.no_grad():
        logits = seeded(3, model, text.clone(), image)
    loss, grads = seeded(4, loss_and_grads, model, text, image)
    keep = ~model.logits_mask[:, :logits.shape[1]].expand_as(logits)
    assert (logits - eval_logits)[keep].abs().max() > 0.1  # dropout is active
    close(logits[keep], logits64[keep], logits_pt[keep], f"{kind} training logits")
    close(loss, loss64, loss_pt, f"{kind} training loss")
    close(grads, grads64, grads_pt, f"{kind} training gradients")


def test_reversible_training_with_dropout_matches():
    """reversible=True in training with attn_dropout and ff_dropout: the reversible backward recomputes
    every block under the RNG state recorded in the forward, and the patched layers draw as the
    originals do, so loss and gradients match for the same seed."""
    model = make_model(depth=2, reversible=True, attn_dropout=0.3, ff_dropout=0.3).train()
    ref64 = copy.deepcopy(model).double()
    text, image = batch()
    loss_pt, grads_pt = seeded(4, loss_and_grads, model, text, image)
    loss64, grads64 = seeded(4, loss_and_grads, ref64, text, image)
    with torch.no_grad():
        assert abs(seeded(5, model, text.clone(), image, True) - loss_pt) > 1e-3  # dropout is active
    dfp.patch(model)
    loss, grads = seeded(4, loss_and_grads, model, text, image)
    close(loss, loss64, loss_pt, "reversible training loss")
    close(grads, grads64, grads_pt, "reversible training gradients")


def test_float64_model_forward_and_refused_generation():
    """A float64 model: the patched forward, loss and gradients run dalle_fast's reference attention
    (the kernels take float32/bfloat16/float16) and equal the unpatched float64 model's; generate,
    whose cached decode runs the kernels, refuses it with a ValueError naming the dtype."""
    model = make_model(depth=4).double()
    text, image = batch()
    with torch.no_grad():
        logits_pt = model(text.clone(), image)
    loss_pt, grads_pt = loss_and_grads(model, text, image)
    dfp.patch(model)
    with torch.no_grad():
        logits = model(text.clone(), image)
    loss, grads = loss_and_grads(model, text, image)
    keep = ~model.logits_mask[:, :logits.shape[1]].expand_as(logits)
    torch.testing.assert_close(logits[keep], logits_pt[keep], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, loss_pt, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads, grads_pt, rtol=1e-10, atol=1e-10)
    for m in (model, dfp.unpatch(model)):
        with pytest.raises(ValueError, match="float64.*generate"):
            dfp.generate(m, text, filter_thres=1.0)


def test_patched_loss_skips_the_masked_logits():
    """patch installs the loss that computes only the unmasked logits (DALLE.forward of 1.6.6 is
    recognised), unpatch removes it, and a forward it does not recognise is left alone."""
    model = make_model()
    dfp.patch(model)
    assert dfp._has_loss_forward(model) and model.forward.func is dfp._loss_forward
    dfp.unpatch(model)
    assert "forward" not in model.__dict__
    known = dfp._KNOWN_FORWARD_SHA256
    try:
        dfp._KNOWN_FORWARD_SHA256 = set()
        dfp.patch(model)
        assert "forward" not in model.__dict__ and dfp.is_patched(model)
    finally:
        dfp._KNOWN_FORWARD_SHA256 = known


def test_patched_loss_with_caption_dropout_and_raw_images():
    """null_cond_prob (same random draws, caller's text left alone) and raw images through the VAE."""
    model = make_model()
    text, image = batch(b=4)
    pixels = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        torch.manual_seed(5)
        ref = model(text.clone(), image, return_loss=True, null_cond_prob=0.5)
        ref_pixels = model(text.clone(), pixels, return_loss=True)
        dfp.patch(model)
        before = text.clone()
        torch.manual_seed(5)
        ours = model(text, image, return_loss=True, null_cond_prob=0.5)
        ours_pixels = model(text, pixels, return_loss=True)
    assert torch.equal(text, before)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_pixels, ref_pixels, rtol=1e-5, atol=1e-5)
    torch.manual_seed(5)  # the draw DALLE-pytorch makes: some captions are dropped, so the loss moves
    assert (torch.zeros(4).uniform_(0, 1) < 0.5).any()
    with torch.no_grad():
        full = model(text, image, return_loss=True)
    assert not torch.allclose(ours, full)


def test_forward_without_rotary_embeddings():
    # DALLE-pytorch's axial/conv modules scale q in place, which autograd refuses without rotary
    # embeddings, so this configuration is compared in inference only
    model = make_model(rotary_emb=False)
    ref64 = copy.deepcopy(model).double()
    text, image = batch()
    with torch.no_grad():
        logits_pt, logits64 = model(text, image), ref64(text, image)
        logits = dfp.patch(model)(text, image)
    keep = ~model.logits_mask.expand_as(logits)
    close(logits[keep], logits64[keep], logits_pt[keep], "rotary_emb=False logits")


def test_patch_keeps_parameters_and_unpatch_restores_modules():
    model = make_model()
    originals = [m for m in model.modules() if isinstance(m, dp_attention.Attention)
                 or isinstance(m, (dp_attention.SparseAxialCausalAttention, dp_attention.SparseConvCausalAttention))]
    params, keys = list(model.parameters()), list(model.state_dict())
    dfp.patch(model)
    assert dfp.is_patched(model)
    assert not any(m in originals for m in model.modules())
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert list(model.state_dict()) == keys
    dfp.patch(model)  # idempotent
    dfp.unpatch(model)
    assert not dfp.is_patched(model)
    restored = [m for m in model.modules() if m in originals]
    assert len(restored) == len(originals) == 4


def test_patch_of_shared_layers_shares_the_stand_in():
    """shared_attn_ids: the layers that share an attention module share its stand-in (one set of
    parameters, as before), and unpatch puts the one original back into each of them."""
    model = make_model(**CONFIGS["shared_layers"])
    params, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    # LayerScale > PreNorm > CachedAs > PreShiftToken > CachedAs/NonCached (per layer) > attention
    attn = [f.fn.fn.fn.fn for f, _ in model.transformer.layers.layers]
    originals = [a.fn for a in attn]
    assert originals[0] is originals[2] and originals[1] is originals[3] and originals[0] is not originals[1]
    dfp.patch(model)
    patched = [a.fn for a in attn]
    assert all(isinstance(p, dfp.DallePytorchAttention) for p in patched)
    assert patched[0] is patched[2] and patched[1] is patched[3] and patched[0] is not patched[1]
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    dfp.unpatch(model)
    assert all(a.fn is o for a, o in zip(attn, originals))


def test_patched_model_survives_torch_save_and_load():
    """torch.save(model) of a patched model loads back patched, with the same loss (the loss forward
    was a bound method, which pickles as getattr(model, '_loss_forward') and failed to load)."""
    import io
    model = make_model(depth=2)
    text, image = batch()
    dfp.patch(model)
    with torch.no_grad():
        loss = model(text.clone(), image, return_loss=True)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert dfp.is_patched(loaded) and dfp._has_loss_forward(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(text.clone(), image, return_loss=True), loss)
    dfp.unpatch(loaded)
    assert not dfp.is_patched(loaded) and "forward" not in loaded.__dict__
    with torch.no_grad():
        torch.testing.assert_close(loaded(text.clone(), image, return_loss=True), loss, rtol=1e-5, atol=1e-5)


def test_patch_a_subclass_whose_forward_source_is_unavailable():
    """A DALLE subclass defined where inspect cannot read its source (exec, python -c, a notebook
    cell) is patched, with its own forward left alone (was: OSError from inspect.getsource after the
    attention modules had already been swapped)."""
    namespace = {"DALLE": dalle_pytorch.DALLE}
    exec("class ExecDALLE(DALLE):\n    def forward(self, *args, **kw):\n        return super().forward(*args, **kw)\n",
         namespace)
    model = make_model(depth=2)
    model.__class__ = namespace["ExecDALLE"]
    text, image = batch()
    with torch.no_grad():
        ref = model(text.clone(), image, return_loss=True)
    dfp.patch(model)
    assert dfp.is_patched(model) and "forward" not in model.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(text.clone(), image, return_loss=True), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def original_codes(model, text, **kw):
    """Image tokens of ``model.generate_images`` (the VAE decode replaced by a recorder)."""
    seen = []
    model.vae.decode = lambda codes: seen.append(codes.clone()) or codes
    try:
        model.generate_images(text, **kw)
    finally:
        del model.vae.decode
    return seen[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot,dim_head", [(10, 16), (16, 16)])
def test_decode_step_rotary_is_rotary_embedding_torchs_bit_for_bit(rot, dim_head, dtype):
    """The decode step's rotary embedding (tables made once per generation) gives the same bits as
    rotary_embedding_torch's apply_rotary_emb, which DALLE-pytorch calls, on q/k/v of a step."""
    from rotary_embedding_torch import apply_rotary_emb

    g = torch.Generator().manual_seed(3)
    freqs = (torch.randn(1, 40, rot, generator=g) * 30).to(dtype)
    qkv = torch.randn(3, 2, 4, 1, dim_head, generator=g).to(dtype)
    cos, sin = dfp._rotary_tables(freqs)
    for index in (0, 17, 39):
        want = apply_rotary_emb(freqs[:, index:index + 1], qkv)
        got = dfp._apply_rotary(qkv, cos[:, index:index + 1], sin[:, index:index + 1])
        assert got.dtype == want.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("name", ["mix", "mix_stable_sandwich", "mix_no_shift", "optimize_for_inference",
                                  "shared_input_output_emb", "shared_layers", "shared_sparse_layers", "reversible"])
def test_greedy_generation_equals_generate_images(name):
    model = make_model(**CONFIGS[name])
    text, _ = batch(3)
    ref = original_codes(model, text.clone(), filter_thres=1.0)  # top-k of 1: greedy
    codes = dfp.generate(model, text, filter_thres=1.0)
    assert codes.shape == (3, S * S) and codes.dtype == torch.int64
    assert torch.equal(codes, ref), (codes, ref)
    assert len(set(ref.flatten().tolist())) > 4  # the model is not degenerate
    dfp.patch(model)  # patched forward inside DALLE-pytorch's own (uncached) loop, and generate on it
    assert torch.equal(original_codes(model, text.clone(), filter_thres=1.0), ref)
    assert torch.equal(dfp.generate(model, text, filter_thres=1.0), ref)


def cached_image_logits(model, text, codes):
    """Image logits ``(B, S*S, V_img)`` of generate's cached path (prefill, then one decode step per
    image token) fed with ``codes`` instead of drawing: entry ``j`` predicts code ``j`` (float32: the
    head's output, at the model's precision, read as float32)."""
    from dalle_fast.engine import Engine, SampleOptions
    spec = dfp._inspect(model)
    with torch.no_grad():
        engine = Engine(dfp._StepModel(model.eval(), spec), dfp._text_ids(model, text), 1, text_len=spec.text_len,
                        seeds=torch.zeros(text.shape[0], dtype=torch.int64), opts=SampleOptions(1.0, 1.0, 0, 1.0),
                        guided=False, sample=dfp.sample)
        out = [engine.first_logits]
        for j in range(1, codes.shape[1]):
            engine.tokens.copy_(codes[:, j - 1])
            engine.run_step(draw_next=False)
            out.append(engine.logits)
    engine.close()
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["mix", "mix_stable_sandwich", "shared_sparse_layers", "reversible"])
def test_bfloat16_model_is_as_accurate_as_dalle_pytorch(name):
    """A bfloat16 model, patched: logits, loss and gradients, and the cached generation path's image
    logits, each at most 2x as far from the float64 model as the unpatched bfloat16 model is, plus two
    bfloat16 epsilons of the values' magnitude (a few ulps)."""
    model = make_model(**CONFIGS[name])
    ref64, bf = copy.deepcopy(model).double(), copy.deepcopy(model).bfloat16()
    text, image = batch()
    T, V = model.text_seq_len, model.num_text_tokens
    with torch.no_grad():
        logits64, logits_pt = ref64(text.clone(), image), bf(text.clone(), image)
    if CONFIGS[name].get("reversible"):  # (see test_forward_loss_and_gradients_match)
        ref64.train(), bf.train()
    loss64, grads64 = loss_and_grads(ref64, text, image)
    loss_pt, grads_pt = loss_and_grads(bf, text, image)
    cached = cached_image_logits(bf, text, image)  # (generate's path; patch-independent)
    dfp.patch(bf)
    with torch.no_grad():
        logits = bf(text.clone(), image)
    loss, grads = loss_and_grads(bf, text, image)
    assert logits.dtype == loss.dtype == grads.dtype == torch.bfloat16

    def close16(ours, ref, pt, what):
        floor = 2 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
        assert_close_to_reference(ours.double(), ref, pt.double(), what, floor=floor)

    keep = ~model.logits_mask[:, :logits.shape[1]].expand_as(logits)
    close16(logits[keep], logits64[keep], logits_pt[keep], f"{name} bfloat16 logits")
    close16(loss, loss64, loss_pt, f"{name} bfloat16 loss")
    close16(grads, grads64, grads_pt, f"{name} bfloat16 gradients")
    close16(cached, logits64[:, T:, V:], logits_pt[:, T:, V:], f"{name} bfloat16 cached image logits")


def test_greedy_generation_with_image_priming():
    model = make_model(rotary_emb=False)
    text, _ = batch(2)
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = original_codes(model, text.clone(), filter_thres=1.0, img=img, num_init_img_tokens=5)
    codes = dfp.generate(model, text, filter_thres=1.0, img=img, num_init_img_tokens=5)
    assert torch.equal(codes[:, :5], model.vae.get_codebook_indices(img)[:, :5])
    assert torch.equal(codes, ref)


def guided_reference(model, text, codes, cond_scale):
    """Guided image logits ``(B, S*S, V_img)`` of ``model`` fed with ``codes``: the correct
    classifier-free guidance (conditional and all-padding caption, prompt untouched)."""
    null = torch.zeros_like(text)
    out = []
    with torch.no_grad():
        for m in range(S * S):
            cond = model(text.clone(), codes[:, :m])[:, -1]
            uncond = model(null.clone(), codes[:, :m])[:, -1]
            out.append((uncond + (cond - uncond) * cond_scale)[:, model.num_text_tokens:])
    return torch.stack(out, 1)


def test_guided_generation_is_correct_and_leaves_the_prompt_alone():
    model = make_model()
    text, _ = batch(2)
    before = text.clone()
    codes = dfp.generate(model, text, filter_thres=1.0, cond_scale=3.0)
    assert torch.equal(text, before)
    expected = guided_reference(model, text, codes, 3.0).argmax(-1)
    assert torch.equal(codes, expected)
    assert not torch.equal(codes, dfp.generate(model, text, filter_thres=1.0))  # guidance changed something


def test_sampling_respects_filter_thres_and_seed():
    model = make_model()
    text, _ = batch(2)
    k = 3
    thres = 1 - (k + 0.5) / model.total_tokens  # DALLE-pytorch keeps max(int((1 - thres) * total), 1) = 3
    codes = dfp.generate(model, text, filter_thres=thres, cond_scale=2.0, temperature=1.5, seed=7)
    guided = guided_reference(model, text, codes, 2.0)
    top = guided.topk(k, dim=-1).indices
    assert (top == codes[..., None]).any(-1).all()  # every draw is among the top 3
    assert not torch.equal(codes, guided.argmax(-1))  # and it does sample
    assert torch.equal(codes, dfp.generate(model, text, filter_thres=thres, cond_scale=2.0, temperature=1.5, seed=7))
    assert not torch.equal(codes, dfp.generate(model, text, filter_thres=thres, cond_scale=2.0, temperature=1.5))
    # image b depends on seed + b only, not on the batch
    one = dfp.generate(model, text[1:], filter_thres=thres, cond_scale=2.0, temperature=1.5, seed=8)
    assert torch.equal(one[0], codes[1])



def test_generate_raises_on_a_flagged_draw(monkeypatch):
    """A draw the sampler flags (on CUDA: NaN/+inf or all -inf logits give a token and a flag on the
    device, no host sync) makes generate raise once the codes are done instead of returning them."""
    model = make_model()
    text, _ = batch(2)
    real = dfp.sample

    def flagging(*args, return_error_flag=False, **kw):
        tokens, flags = real(*args, return_error_flag=True, **kw)
        if kw["step"] == 2:
            flags = torch.tensor([0, 1], dtype=torch.int32)
        return (tokens, flags) if return_error_flag else tokens

    monkeypatch.setattr(dfp, "sample", flagging)
    with pytest.raises(RuntimeError, match=r"dalle_pytorch.generate: .*NaN or \+inf in 1 of 2 rows \(first: row 1\)"):
        dfp.generate(model, text, filter_thres=1.0)
    monkeypatch.setattr(dfp, "sample", real)
    assert dfp.generate(model, text, filter_thres=1.0).shape == (2, S * S)


# ---------------------------------------------------------------------------------------------
# the options of DALLE(...) (dalle-pytorch 1.6.6), one at a time and combined
# ---------------------------------------------------------------------------------------------
SWEEP = {
    "dalle_defaults": dict(attn_types=None, depth=2),  # full attention, token shift, rotary embeddings
    "axial_row_col": dict(attn_types=("axial_row", "axial_col"), depth=2),
    "conv_full": dict(attn_types=("conv_like", "full"), depth=2),
    "all_kinds": dict(),
    "image_8x8": dict(image_size=32),
    "text_seq_len_1": dict(text_seq_len=1),
    "depth_1": dict(depth=1, attn_types=("conv_like",)),
    "heads_1_dim_head_12": dict(heads=1, dim_head=12),
    "dim_64_heads_4": dict(dim=64, heads=4, dim_head=16),
    "rotary_emb_false": dict(rotary_emb=False),
    "shift_tokens_false": dict(shift_tokens=False),
    "stable": dict(stable=True),
    "sandwich_norm": dict(sandwich_norm=True),
    "dropouts_in_eval": dict(attn_dropout=0.3, ff_dropout=0.3),
    "loss_img_weight_1": dict(loss_img_weight=1),
    "share_input_output_emb": dict(share_input_output_emb=True),
    "shared_attn_ids": dict(attn_types=("axial_col", "full"), shared_attn_ids=(0, 1, 0, 1)),
    "shared_ff_ids": dict(shared_ff_ids=(0, 0, 1, 1)),
    "reversible": dict(reversible=True),
    "reversible_shared_stable": dict(reversible=True, stable=True, attn_types=("conv_like",), shared_attn_ids=(0, 0),
                                     depth=2),
    "optimize_for_inference": dict(attn_types=("axial_row", "axial_col", "full"), depth=3,
                                   optimize_for_inference=True),
    "sparse_attn_flag": dict(sparse_attn=True),  # (read but unused by 1.6.6's Transformer)
    "everything": dict(attn_types=("axial_row", "conv_like", "axial_col", "full"), depth=4, stable=True,
                       sandwich_norm=True, attn_dropout=0.1, ff_dropout=0.1, loss_img_weight=3, heads=4, dim_head=12,
                       shared_attn_ids=(0, 1, 2, 3), shared_ff_ids=(0, 1, 0, 1), share_input_output_emb=True,
                       image_size=32),
}
SWEEP_REFUSED = {  # name: (options, the option the ValueError names)
    "sparse_attention_type": (dict(attn_types=("full", "sparse"), depth=2), "attn_types"),
}


def deepspeed_stand_in(monkeypatch):
    """A stand-in ``deepspeed.ops.sparse_attention`` so that DALLE-pytorch builds its 'sparse' type."""
    ds = types.ModuleType("deepspeed.ops.sparse_attention")
    ds.SparseSelfAttention = lambda **kw: torch.nn.Identity()
    ds.VariableSparsityConfig = lambda **kw: None
    for name in ("deepspeed", "deepspeed.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed.ops.sparse_attention", ds)


@pytest.mark.parametrize("name", sorted(SWEEP))
def test_constructor_option_sweep(name):
    """Eval logits and loss of the patched model, and the image logits of generate's cached path,
    each within 2x the unpatched float32 model's error against the float64 model."""
    model = make_model(**SWEEP[name])
    ref64 = copy.deepcopy(model).double()
    text, image = batch(text_len=model.text_seq_len, image_tokens=model.image_seq_len)
    T, V = model.text_seq_len, model.num_text_tokens
    with torch.no_grad():
        logits_pt, logits64 = model(text.clone(), image), ref64(text.clone(), image)
        loss_pt, loss64 = model(text.clone(), image, return_loss=True), ref64(text.clone(), image, return_loss=True)
        dfp.patch(model)
        logits, loss = model(text.clone(), image), model(text.clone(), image, return_loss=True)
    cached = cached_image_logits(model, text, image)
    keep = ~model.logits_mask[:, :logits.shape[1]].expand_as(logits)
    close(logits[keep], logits64[keep], logits_pt[keep], f"{name} logits")
    close(loss, loss64, loss_pt, f"{name} loss")
    close(cached, logits64[:, T:, V:], logits_pt[:, T:, V:], f"{name} cached image logits")


@pytest.mark.parametrize("name", ["dalle_defaults", "all_kinds", "rotary_emb_false", "shift_tokens_false",
                                  "sandwich_norm", "dropouts_in_eval", "shared_attn_ids", "reversible"])
def test_eager_cpu_step_runs_one_op_per_branch(name, monkeypatch):
    """On the CPU in float32 (every instruction set), generate's eager step runs each layer as the two
    branch ops (dalle_fast.ops.branch), with the same logits as the modules' path within float32
    rounding; a model in training mode with active dropout keeps the modules' path."""
    from dalle_fast.ops.branch import AttentionBranch
    if not AttentionBranch.serves(torch.device("cpu"), torch.float32):
        pytest.skip("decode_attention is forced off the cpu backend ($DALLE_FAST_BACKEND)")
    model = make_model(**SWEEP[name])
    text, image = batch(text_len=model.text_seq_len, image_tokens=model.image_seq_len)
    fused = cached_image_logits(model, text, image)
    made = []
    real = dfp._StepModel._branches
    monkeypatch.setattr(dfp._StepModel, "_branches", lambda self: made.append(real(self)) or None)
    modules = cached_image_logits(model, text, image)
    assert made and made[0] is not None and len(made[0]) == len(dfp._inspect(model).layers)
    assert (fused - modules).abs().max().item() <= 1e-4 * modules.abs().max().item(), name
    assert torch.equal(fused[:, 0], modules[:, 0])
    if name == "dropouts_in_eval":  # training mode: dropout is drawn by the modules, not the branch ops
        spec = dfp._inspect(model)
        step = dfp._StepModel(model.train(), spec)
        made.clear()
        step.setup_caches(torch.arange(2))
        assert made == [None]
        model.eval()


@pytest.mark.parametrize("name", sorted(SWEEP_REFUSED))
def test_constructor_option_sweep_refusals(name, monkeypatch):
    deepspeed_stand_in(monkeypatch)
    options, option = SWEEP_REFUSED[name]
    model = make_model(**options)
    text, _ = batch()
    for call in (dfp.patch, dfp.layouts, lambda m: dfp.generate(m, text)):
        with pytest.raises(ValueError, match=option):
            call(model)
    assert not dfp.is_patched(model)


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
def test_refuses_unsupported_models(monkeypatch):
    with pytest.raises(ValueError, match="model must be a dalle_pytorch.DALLE"):
        dfp.patch(torch.nn.Linear(2, 2))
    deepspeed_stand_in(monkeypatch)  # the DeepSpeed 'sparse' type: build it against a stand-in deepspeed module
    with pytest.raises(ValueError, match="'sparse' attention"):
        dfp.patch(make_model(depth=2, attn_types=("full", "sparse")))


def test_refuses_modified_modules():
    """Models edited after construction into something the layouts or the adapter's reading of the
    structure do not reproduce are refused, each with a ValueError naming what."""
    text, _ = batch()

    def edited(edit, **kw):
        model = make_model(depth=3, **kw)
        edit(model)
        return model

    def attn(model, i):  # LayerScale > PreNorm > CachedAs > PreShiftToken > CachedAs/NonCached > attention
        return model.transformer.layers.layers[i][0].fn.fn.fn.fn.fn

    def non_causal(model):
        attn(model, 0).causal = False

    def other_static_mask(model):
        attn(model, 1).static_mask[-1, -5] = False  # one allowed key dropped: no longer axial_col

    def other_feed_forward(model):
        model.transformer.layers.layers[2][1].fn.fn.fn.fn = torch.nn.Identity()

    def other_head(model):
        model.to_logits = torch.nn.Sequential(model.to_logits[0], torch.nn.Identity(), model.to_logits[1])

    cases = [(non_causal, {}, "causal"),
             (other_static_mask, dict(attn_types=("axial_row", "axial_col", "full"), optimize_for_inference=True),
              "optimize_for_inference"),
             (other_feed_forward, {}, "feed-forward"),
             (other_head, {}, "to_logits")]
    for edit, kw, match in cases:
        model = edited(edit, **kw)
        for call in (dfp.patch, dfp.layouts, lambda m: dfp.generate(m, text)):
            with pytest.raises(ValueError, match=match):
                call(model)
        assert not dfp.is_patched(model)


def test_refuses_unsupported_calls():
    model = make_model(depth=2)
    text, image = batch()
    dfp.patch(model)
    with pytest.raises(ValueError, match="cache"):
        # (DALLE-pytorch 1.6.6 passes its cache to the layers only when cond_scale != 1)
        model.generate_images(text, filter_thres=1.0, use_cache=True, cond_scale=2.0)
    attn = next(m for m in model.modules() if isinstance(m, dfp.DallePytorchAttention))
    with pytest.raises(ValueError, match="mask"):
        attn(torch.zeros(1, 3, 32), mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="filter_thres"):
        dfp.generate(model, text, filter_thres=1.5)
    with pytest.raises(ValueError, match="text"):
        dfp.generate(model, text[:, :3])
    with pytest.raises(ValueError, match="text ids"):
        dfp.generate(model, text + 1000)
    with pytest.raises(ValueError, match="num_init_img_tokens"):
        dfp.generate(model, text, num_init_img_tokens=3)
    with pytest.raises(ValueError, match="num_init_img_tokens"):
        dfp.generate(model, text, img=torch.rand(2, 3, 16, 16), num_init_img_tokens=S * S)
    for img in (torch.rand(2, 1, 16, 16), torch.rand(2, 3, 32, 32), torch.rand(1, 3, 16, 16)):
        with pytest.raises(ValueError, match="img must be"):
            dfp.generate(model, text, img=img, num_init_img_tokens=2)
    with pytest.raises(ValueError, match="at least one caption"):
        dfp.generate(model, text[:0])


def test_generate_refuses_a_seed_outside_int64():
    """seed=2**64 raised OverflowError from torch.arange(B) + seed instead of a ValueError naming seed."""
    model = make_model(depth=1)
    text, _ = batch()
    for seed in (2**63, 2**64, -2**63 - 1):
        with pytest.raises(ValueError, match="seed"):
            dfp.generate(model, text, filter_thres=1.0, seed=seed)


def test_generate_without_a_seed_draws_fresh_samples_that_manual_seed_reproduces():
    """seed=None (the default): each call samples anew, as DALLE-pytorch's generate_images does,
    and torch.manual_seed makes the calls reproducible."""
    model = make_model(depth=2)
    text, _ = batch()
    kw = dict(filter_thres=0.5, temperature=1.0)
    first, second = dfp.generate(model, text, **kw), dfp.generate(model, text, **kw)
    assert not torch.equal(first, second)
    torch.manual_seed(5)
    again = dfp.generate(model, text, **kw)
    torch.manual_seed(5)
    assert torch.equal(again, dfp.generate(model, text, **kw))


def test_generate_images_decodes_and_ranks_with_clip():
    """dfp.generate_images: the images of the codes generate draws, and with clip=, DALLE-pytorch's
    (images, scores) with the scores CLIP gives the captions and those images."""
    model = make_model(depth=2)
    text, _ = batch()
    torch.manual_seed(0)
    clip = dalle_pytorch.CLIP(dim_text=16, dim_image=16, dim_latent=8, num_text_tokens=50, text_enc_depth=1,
                              text_seq_len=TEXT_LEN, text_heads=2, num_visual_tokens=32, visual_enc_depth=1,
                              visual_heads=2, visual_image_size=16, visual_patch_size=8).eval()
    codes = dfp.generate(model, text, filter_thres=0.9, seed=3)
    images = dfp.generate_images(model, text, filter_thres=0.9, seed=3)
    with torch.no_grad():
        expect = model.vae.decode(codes)
        assert torch.equal(images, expect)
        ranked, scores = dfp.generate_images(model, text, clip=clip, filter_thres=0.9, seed=3)
        assert torch.equal(ranked, expect) and scores.shape == (2,)
        assert torch.allclose(scores, clip(text, expect, return_loss=False))
