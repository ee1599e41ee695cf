"""Generation: cached decode == full forward for every layer kind, guidance, seeds, batch-size
independence, priming, reranking, errors, and a tiny model that learns its captions."""
import pytest
import torch

from conftest import KINDS7, MICRO, micro_dalle

from dalle_fast.data.shapes import ShapesDataset
from dalle_fast.generate import generate_codes, generate_images, load_pipeline, teacher_forced_logits
from dalle_fast.models.clip import CLIP, CLIPConfig
from dalle_fast.models.dalle import DALLE, DALLEConfig
from dalle_fast.models.dvae import DVAE, DVAEConfig
from dalle_fast.tokenizer import Tokenizer
from dalle_fast.train import TrainConfig, Trainer, dalle_loss

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return micro_dalle()


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("attention", ["sparse", "dense"])
@pytest.mark.parametrize("kind", KINDS7 + ("all",))
def test_teacher_forced_cached_logits_equal_full_forward(kind, attention, guided):
    m = micro_dalle(1, **({} if kind == "all" else dict(depth=2, kinds=(kind, kind))))
    text, codes = torch.randint(0, 35, (3, 4)), torch.randint(0, 24, (3, 4, 4))
    ours = teacher_forced_logits(m, text, codes, guided=guided, attention=attention)
    with torch.no_grad():
        full = m.logits(text, codes.flatten(1)[:, :-1])[:, 4:, 40:]
        if guided:
            full = torch.cat([full, m.logits(m.null_text(3), codes.flatten(1)[:, :-1])[:, 4:, 40:]])
    assert ours.shape == full.shape == ((6 if guided else 3), 16, 24)
    assert full.std() > 0.5  # not a degenerate model
    torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opts", [dict(cfg_scale=3.0), dict(cfg_scale=-0.5, temperature=0.7, top_k=5),
                                  dict(cfg_scale=2.0, top_p=0.8), dict(temperature=0.0)])
def test_cached_equals_uncached_and_guidance_leaves_prompt(model, opts):
    text = torch.randint(0, 35, (2, 4))
    before = text.clone()
    runs = {a: generate_codes(model, text, 3, seed=11, attention=a, **opts) for a in ("sparse", "dense", "none")}
    assert torch.equal(text, before)
    assert runs["sparse"].shape == (2, 3, 4, 4)
    assert torch.equal(runs["sparse"], runs["none"]) and torch.equal(runs["dense"], runs["none"])


def test_guidance_changes_samples(model):
    text = torch.randint(0, 35, (2, 4))
    plain = generate_codes(model, text, 4, seed=0)
    guided = generate_codes(model, text, 4, seed=0, cfg_scale=4.0)
    assert not torch.equal(plain, guided)


def test_seeds_and_batch_size_independence(model):
    text = torch.randint(0, 35, (2, 4))
    a = generate_codes(model, text, 4, seed=7, cfg_scale=2.0)
    assert torch.equal(a, generate_codes(model, text, 4, seed=7, cfg_scale=2.0))
    assert not torch.equal(a, generate_codes(model, text, 4, seed=8, cfg_scale=2.0))
    # fewer candidates / one prompt: an image depends only on its prompt and seed
    seeds = torch.tensor([7 + 4 + 2, 7 + 4 + 3])  # prompt 1, candidates 2 and 3
    alone = generate_codes(model, text[1:], 2, seeds=seeds, cfg_scale=2.0)
    assert torch.equal(alone[0], a[1, 2:])
    first = generate_codes(model, text[:1], 1, seed=7, cfg_scale=2.0)
    assert torch.equal(first[0, 0], a[0, 0])


def test_priming(model):
    text = torch.randint(0, 35, (2, 4))
    prime = torch.randint(0, 24, (2, 2, 4))  # first two rows
    out = generate_codes(model, text, 3, prime=prime, seed=1, cfg_scale=1.5)
    assert torch.equal(out[:, :, :2], prime[:, None].expand(-1, 3, -1, -1))
    assert torch.equal(out, generate_codes(model, text, 3, prime=prime, seed=1, cfg_scale=1.5, attention="none"))
    with pytest.raises(ValueError, match="prime"):
        generate_codes(model, text, 1, prime=torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="prime"):
        generate_codes(model, text, 1, prime=torch.zeros(3, 4, dtype=torch.long))


def test_bad_arguments(model):
    text = torch.randint(0, 35, (1, 4))
    for kw, name in ((dict(attention="flash"), "attention"), (dict(num_images=0), "num_images"),
                     (dict(seeds=torch.zeros(2, dtype=torch.long)), "seeds"), (dict(top_p=0.0), "top_p")):
        with pytest.raises(ValueError, match=name):
            generate_codes(model, text, **{"num_images": 1, **kw})
    with pytest.raises(ValueError, match="cuda_graph"):
        generate_codes(model, text, 1, cuda_graph=True)
    for scale in (None, True, "3", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cfg_scale"):
            generate_codes(model, text, 1, cfg_scale=scale)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_codes(model, text[:0], 1)


@pytest.fixture(scope="module")
def stack():
    """Tokenizer, 16 px dVAE (4x4 codes), CLIP and a transformer that fit together (untrained)."""
    tok = Tokenizer.train(ShapesDataset(size=16, length=64).captions() * 2, vocab_size=300 + 16, text_len=15)
    torch.manual_seed(2)
    dvae = DVAE(DVAEConfig(image_size=16, vocab_size=24, n_hid=16, n_init=16, n_blk_per_group=1,
                           group_count=3)).eval()
    clip = CLIP(CLIPConfig.for_tokenizer(tok, "tiny", image_size=16, patch_size=4)).eval()
    model = DALLE(DALLEConfig.for_tokenizer(tok, "tiny", image_vocab=24, image_size=4, dim=32, depth=2, heads=2,
                                            dim_head=16)).eval()
    return tok, dvae, clip, model


def test_generate_images_reranks(stack):
    tok, dvae, clip, model = stack
    caps = ["a red circle above a blue square", "a small green triangle"]
    g = generate_images(model, dvae, tok, caps, 4, clip=clip, seed=3, batch_size=3)
    assert g.images.shape == (2, 4, 3, 16, 16) and g.codes.shape == (2, 4, 4, 4)
    assert torch.all(g.scores[:, :-1] >= g.scores[:, 1:])
    # the sorted images are the decoded sorted codes, with the same scores, and chunking is invisible
    torch.testing.assert_close(g.images[1], dvae.decode(g.codes[1]))
    ids = tok.encode(caps, text_len=clip.config.text_len)
    torch.testing.assert_close(g.scores[0], clip.score(ids[:1].expand(4, -1), g.images[0]))
    plain = generate_images(model, dvae, tok, caps, 4, seed=3)
    assert plain.scores is None
    assert sorted(map(str, plain.codes[0].flatten(1).tolist())) == sorted(map(str, g.codes[0].flatten(1).tolist()))


def test_generation_errors(stack, tmp_path):
    tok, dvae, clip, model = stack
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        generate_images(model, dvae, tok, ["a red circle", ""], 1)
    big = DVAE(DVAEConfig(image_size=32, vocab_size=24, n_hid=16, n_init=16, n_blk_per_group=1, group_count=3))
    with pytest.raises(ValueError, match="dVAE"):
        generate_images(model, big, tok, "a red circle", 1)
    with pytest.raises(ValueError, match="image size"):
        generate_images(model, dvae, tok, "a red circle", 1,
                        clip=CLIP(CLIPConfig.for_tokenizer(tok, "tiny", image_size=32, patch_size=4)))
    with pytest.raises(ValueError, match="checkpoint"):
        load_pipeline(tmp_path / "missing")
    for kw, name in ((dict(num_images=0), "num_images"), (dict(num_images=1.5), "num_images"),
                     (dict(num_images=True), "num_images"), (dict(batch_size=-1), "batch_size"),
                     (dict(batch_size=True), "batch_size"), (dict(batch_size=2.0), "batch_size"),
                     (dict(seeds=torch.zeros(1, dtype=torch.long)), "seeds")):
        with pytest.raises(ValueError, match=name):
            generate_images(model, dvae, tok, "a red circle", **{"num_images": 2, **kw})


class _Fixed(torch.utils.data.Dataset):
    def __init__(self, text, codes, repeat):
        self.text, self.codes, self.repeat = text, codes, repeat

    def __len__(self):
        return len(self.text) * self.repeat

    def __getitem__(self, i):
        return {"text_ids": self.text[i % len(self.text)], "codes": self.codes[i % len(self.text)]}


def test_tiny_model_overfits_captions_and_generates_them():
    torch.manual_seed(0)
    cfg = DALLEConfig(**{**MICRO, **dict(depth=2, kinds=None, dim=64, heads=4, dim_head=16, caption_dropout=0.0)})
    text = torch.randint(0, 35, (4, 4))
    codes = torch.randint(0, 24, (4, 4, 4))
    tc = TrainConfig(steps=250, batch_size=8, lr=3e-3, warmup_steps=20, progress=False, seed=0, log_every=50,
                     checkpoint_every=10_000)
    trainer = Trainer(DALLE(cfg), dalle_loss, _Fixed(text, codes, 8), tc, None, device="cpu")
    trainer.fit()
    assert trainer.history[-1]["image_loss"] < 0.05
    model = trainer.model.eval()
    greedy = generate_codes(model, text, 1, temperature=0.0)
    assert torch.equal(greedy[:, 0], codes)
    sampled = generate_codes(model, text, 4, seed=5)  # temperature 1: nearly deterministic after overfitting
    assert (sampled == codes[:, None]).float().mean() > 0.9


def test_cuda_graph_refused_without_the_sparse_cuda_path(model):
    text = torch.randint(0, 35, (1, 4))
    for attention in ("none", "dense", "sparse"):  # attention="none" too: cuda_graph=True is never ignored silently
        with pytest.raises(ValueError, match="cuda_graph"):
            generate_codes(model, text, 1, cuda_graph=True, attention=attention)


def test_decode_attention_refuses_shared_text_caches_that_require_grad():
    from dalle_fast import Layout, decode_attention
    layout = Layout("row", text_len=5, image_size=4)
    q, k, v = (torch.randn(3, 2, 1, 16) for _ in range(3))
    pi = torch.zeros(3, dtype=torch.long)
    for which in ("k", "v"):  # the CPU kernel has no backward: the text caches' gradients would be missing
        tk = torch.randn(1, 2, 5, 16, requires_grad=which == "k")
        tv = torch.randn(1, 2, 5, 16, requires_grad=which == "v")
        with pytest.raises(ValueError, match="requires grad"):
            decode_attention(q, k, v, torch.zeros(3, 2, 16, 16), torch.zeros(3, 2, 16, 16), torch.tensor(7), layout,
                             text_k_cache=tk, text_v_cache=tv, prompt_index=pi)
        with torch.no_grad():
            decode_attention(q, k, v, torch.zeros(3, 2, 16, 16), torch.zeros(3, 2, 16, 16), torch.tensor(7), layout,
                             text_k_cache=tk, text_v_cache=tv, prompt_index=pi)


def test_generate_images_checks_seed_and_captions(stack):
    tok, dvae, clip, model = stack
    for seed in (True, 1.5, "3", None):  # True was taken as seed 1, "3" raised a TypeError
        with pytest.raises(ValueError, match="seed must be an int"):
            generate_images(model, dvae, tok, "a red circle", 1, seed=seed)
    with pytest.raises(ValueError, match="captions"):
        generate_images(model, dvae, tok, 5, 1)


def test_clip_must_share_the_tokenizer_vocabulary(stack):
    from dalle_fast.generate import check_compatible
    tok, dvae, clip, model = stack
    check_compatible(model, dvae, tok, clip)
    # another padding range: CLIP would read this tokenizer's padding ids as words and rerank on that
    for kw in (dict(vocab_size=tok.vocab_size + 100, pad_base=tok.pad_base + 50, text_len=tok.text_len),
               dict(vocab_size=100, pad_base=50, text_len=tok.text_len),
               dict(vocab_size=tok.vocab_size, pad_base=tok.pad_base, text_len=tok.text_len + 1)):
        other = CLIP(CLIPConfig.preset("tiny", image_size=16, patch_size=4, **kw)).eval()
        with pytest.raises(ValueError, match="clip"):
            generate_images(model, dvae, tok, "a red circle", 1, clip=other)


def test_teacher_forced_logits_one_entry_per_code(model):
    text = torch.randint(0, 35, (2, 4))
    assert teacher_forced_logits(model, text, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 24)  # was (2, 1, 24)
    assert teacher_forced_logits(model, text, torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 24)
    with pytest.raises(ValueError, match="at least one prompt"):  # was a RuntimeError about text_k_cache
        teacher_forced_logits(model, text[:0], torch.zeros(0, 4, 4, dtype=torch.long))


def _flagging_sample(real, flag_step, flag_row, flag):
    """dalle_fast.sample as the CUDA kernel behaves on a bad row: it draws a token and sets that row's
    error flag (on CPU the kernel raises instead, so the flag path is faked here)."""
    def sample(*args, return_error_flag=False, **kw):
        tokens, flags = real(*args, return_error_flag=True, **kw)
        if int(kw["step"]) == flag_step:
            flags = flags.clone()
            flags[flag_row] = flag
        return (tokens, flags) if return_error_flag else tokens
    return sample


@pytest.mark.parametrize("attention", ["sparse", "dense", "none"])
@pytest.mark.parametrize("flag, what", [(1, "NaN or \\+inf"), (2, "all -inf")])
def test_generate_raises_on_a_flagged_draw(model, monkeypatch, attention, flag, what):
    """A draw the sampler flags (NaN/+inf or all -inf logits: on CUDA it returns a token and sets the
    flag, without a host sync) makes generate_codes raise once the codes are done, instead of
    returning codes that are not samples."""
    import dalle_fast.generate as gen

    text, real = torch.randint(0, 30, (2, 4)), gen.sample
    monkeypatch.setattr(gen, "sample", _flagging_sample(real, 3, 2, flag))
    with pytest.raises(RuntimeError, match=f"generate: .*were {what} in 1 of 4 rows \\(first: row 2\\)"):
        generate_codes(model, text, 2, attention=attention, cfg_scale=2.0)
    monkeypatch.setattr(gen, "sample", _flagging_sample(real, 99, 0, flag))  # no draw flagged: codes
    assert generate_codes(model, text, 2, attention=attention, cfg_scale=2.0).shape == (2, 2, 4, 4)


@pytest.mark.gpu
def test_generate_on_cuda_raises_on_nan_logits(model):
    """The real CUDA path: a model whose logits are NaN flags every row on the device."""
    import copy
    m = copy.deepcopy(model).cuda()
    with torch.no_grad():
        m.head.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="NaN or \\+inf"):
        generate_codes(m, torch.randint(0, 30, (1, 4)).cuda(), 2)


def test_cuda_graph_off_when_the_reference_backend_is_forced(monkeypatch):
    """$DALLE_FAST_BACKEND=reference makes the decode ops sync with the host (pos.tolist(), int(step)),
    which a CUDA graph cannot capture: the default then decodes without a graph and an explicit
    cuda_graph=True is refused by name (rather than failing inside CUDA's capture). Decided per device, so
    it is checked here on a CUDA device object without a GPU."""
    from dalle_fast.engine import resolve_cuda_graph

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("DALLE_FAST_BACKEND", raising=False)
    assert resolve_cuda_graph(None, cuda) and resolve_cuda_graph(True, cuda)
    assert not resolve_cuda_graph(None, cpu) and not resolve_cuda_graph(None, cuda, sparse=False)
    monkeypatch.setenv("DALLE_FAST_BACKEND", "reference")
    assert not resolve_cuda_graph(None, cuda)
    with pytest.raises(ValueError, match="cuda_graph: decode_attention and sample would run on the 'reference'"):
        resolve_cuda_graph(True, cuda)
    assert not resolve_cuda_graph(None, cpu) and not resolve_cuda_graph(False, cuda)
    monkeypatch.setenv("DALLE_FAST_BACKEND", "triton")  # serves neither op: they keep their CUDA kernels
    assert resolve_cuda_graph(None, cuda)
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match="cuda_graph must be True, False or None"):
            resolve_cuda_graph(bad, cuda)
    with pytest.raises(ValueError, match="cuda_graph: the decode step is captured on CUDA only"):
        resolve_cuda_graph(True, cpu)
    with pytest.raises(ValueError, match="cuda_graph needs attention='sparse'"):
        resolve_cuda_graph(True, cuda, sparse=False)


@pytest.mark.gpu
def test_cuda_generation_with_the_reference_backend_forced(model, monkeypatch):
    import copy
    m = copy.deepcopy(model).cuda()
    text = torch.randint(0, 30, (1, 4)).cuda()
    monkeypatch.setenv("DALLE_FAST_BACKEND", "reference")
    codes = generate_codes(m, text, 2, seed=3)  # decodes without a graph
    assert codes.shape == (1, 2, 4, 4) and 0 <= int(codes.min()) and int(codes.max()) < m.config.image_vocab
    with pytest.raises(ValueError, match="cuda_graph: decode_attention and sample .*reference"):
        generate_codes(m, text, 2, cuda_graph=True)


def test_eager_cpu_step_runs_one_op_per_branch(model, monkeypatch):
    """On the CPU in float32 (every instruction set: packed weights or torch's GEMM) the eager decode
    step runs each block as the two branch ops (dalle_fast.ops.branch); its logits equal the module
    path's within float32 rounding."""
    from dalle_fast.models.dalle import Block
    from dalle_fast.ops.branch import AttentionBranch
    if not AttentionBranch.serves(torch.device("cpu"), torch.float32):
        pytest.skip("decode_attention is forced off the cpu backend ($DALLE_FAST_BACKEND)")
    text = torch.randint(0, 40, (3, 4), generator=torch.Generator().manual_seed(2))
    codes = torch.randint(0, 24, (3, 4, 4), generator=torch.Generator().manual_seed(3))
    calls = []
    real = torch.ops.dalle_fast.decode_attention_branch
    monkeypatch.setattr(torch.ops.dalle_fast, "decode_attention_branch", lambda *a: calls.append(1) or real(*a),
                        raising=False)
    fused = teacher_forced_logits(model, text, codes)
    assert len(calls) == len(model.blocks) * 15  # every block at each of the 15 decode steps
    monkeypatch.setattr(Block, "step_branches", lambda *args: None)
    modules = teacher_forced_logits(model, text, codes)
    assert len(calls) == len(model.blocks) * 15
    scale = modules.abs().max().item()
    assert (fused - modules).abs().max().item() <= 1e-4 * scale
    assert torch.equal(fused[:, 0], modules[:, 0])  # the prefill's logits: the same path
