"""dVAE: shapes, input validation, short training, OpenAI converter equivalence."""
import pytest
import torch

from dalle_fast.models.dvae import DVAE, DVAEConfig, codebook_usage, gaussian_nll, logit_laplace_nll, map_pixels

torch.set_num_threads(1)


def tiny(**kw):
    return DVAE(DVAEConfig.preset("tiny", **kw))


def test_presets():
    assert DVAEConfig.preset("paper").latent_size == 32
    assert DVAEConfig.preset("paper").vocab_size == 8192
    assert DVAEConfig.preset("small").latent_size == 16
    assert DVAEConfig.preset("tiny").latent_size == 8
    with pytest.raises(ValueError, match="preset"):
        DVAEConfig.preset("huge")
    with pytest.raises(ValueError, match="image_size"):
        DVAEConfig(image_size=100, group_count=4)


def test_demo_preset_and_likelihood_options():
    demo = DVAEConfig.preset("demo")
    assert demo.latent_size == 8 and demo.vocab_size == 128 and demo.likelihood == "gaussian"
    for name in ("paper", "small", "tiny"):  # the paper recipe stays the default elsewhere
        assert DVAEConfig.preset(name).likelihood == "logit_laplace"
    assert DVAEConfig().likelihood == "logit_laplace"
    with pytest.raises(ValueError, match="likelihood"):
        DVAEConfig(likelihood="mse")
    with pytest.raises(ValueError, match="gaussian_sigma"):
        DVAEConfig(gaussian_sigma=0.0)


def test_diversity_term_is_the_entropy_deficit_of_the_mean_posterior():
    import math
    assert DVAEConfig.preset("demo").diversity_weight > 0
    assert all(DVAEConfig.preset(n).diversity_weight == 0 for n in ("paper", "small", "tiny"))
    with pytest.raises(ValueError, match="diversity_weight"):
        DVAEConfig(diversity_weight=-1.0)
    torch.manual_seed(0)
    m = DVAE(DVAEConfig.preset("demo", diversity_weight=0.0))
    x = torch.rand(3, 3, 32, 32)
    q_bar = torch.softmax(m.logits(x).double(), 1).mean((0, 2, 3))
    want = math.log(128) + (q_bar * q_bar.log()).sum()
    torch.manual_seed(1)
    off = m(x, step=5)
    torch.testing.assert_close(off["diversity"].double(), want, rtol=1e-4, atol=1e-6)
    m.config = DVAEConfig.preset("demo", diversity_weight=2.0)
    torch.manual_seed(1)  # same gumbel noise: the loss differs by exactly the weighted term
    on = m(x, step=5)
    torch.testing.assert_close(on["loss"], off["loss"] + 2.0 * off["diversity"])
    # one code everywhere: the deficit is log K
    with torch.no_grad():
        m.encoder.blocks.output.conv.bias.zero_()[7] = 1e4
    assert abs(m(x, step=5)["diversity"].item() - math.log(128)) < 1e-3


def test_gaussian_nll_is_the_normal_log_density():
    torch.manual_seed(0)
    x, mu = map_pixels(torch.rand(2, 3, 4, 4)), torch.randn(2, 3, 4, 4)
    ref = -torch.distributions.Normal(torch.sigmoid(mu), 0.1).log_prob(x)
    torch.testing.assert_close(gaussian_nll(x, mu, 0.1), ref)


@pytest.mark.parametrize("likelihood", ["logit_laplace", "gaussian"])
def test_forward_recon_uses_the_configured_likelihood(likelihood):
    torch.manual_seed(0)
    m = DVAE(DVAEConfig.preset("demo", likelihood=likelihood))
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(1)
    out = m(x, step=5)
    torch.manual_seed(1)  # same gumbel noise
    tau, _ = m.schedule(5)
    stats = m.decoder(torch.nn.functional.gumbel_softmax(m.logits(x), tau=tau, dim=1))
    mx = map_pixels(x)
    nll = (gaussian_nll(mx, stats[:, :3], m.config.gaussian_sigma) if likelihood == "gaussian"
           else logit_laplace_nll(mx, stats[:, :3], stats[:, 3:]))
    torch.testing.assert_close(out["recon"], nll.mean())


def test_encode_decode_shapes():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.rand(2, 3, 32, 32)
    codes = m.encode(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 512
    y = m.decode(codes)
    assert y.shape == (2, 3, 32, 32)
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_decode_codes_equals_one_hot_decoder():
    torch.manual_seed(0)
    m = tiny().eval()
    codes = torch.randint(0, 512, (2, 8, 8))
    one_hot = torch.nn.functional.one_hot(codes, 512).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(m.decoder.forward_codes(codes), m.decoder(one_hot), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 1, 32, 32), "channels"),
    (torch.rand(2, 3, 16, 16), "16x16"),
    (torch.rand(3, 32, 32), "4-d"),
    (torch.rand(1, 3, 32, 32) * 2, r"\[0, 1\]"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
])
def test_encode_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny().encode(bad)


def test_decode_rejects_bad_codes():
    m = tiny()
    with pytest.raises(ValueError, match="codes must lie"):
        m.decode(torch.full((1, 8, 8), 512))
    with pytest.raises(ValueError, match="codes must lie"):
        m.decode(torch.full((1, 8, 8), -1))
    with pytest.raises(ValueError, match="shape"):
        m.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        m.decode(torch.zeros(1, 8, 8))


def test_logit_laplace_is_a_density():
    # integrate p(x | mu, b) over (0, 1) numerically: must be ~1 (up to the mass outside the grid)
    x = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    for mu, log_b in [(0.0, -1.0), (1.5, -2.0), (-0.7, 0.0)]:
        p = torch.exp(-logit_laplace_nll(x, torch.full_like(x, mu), torch.full_like(x, log_b)))
        assert abs(float(torch.trapezoid(p, x)) - 1) < 2e-3


def test_schedule_endpoints():
    m = tiny()
    tau0, beta0 = m.schedule(0)
    tau1, beta1 = m.schedule(10**9)
    assert tau0 == 1.0 and beta0 == 0.0
    assert tau1 == pytest.approx(1 / 16) and beta1 == pytest.approx(6.6)
    taus = [m.schedule(s)[0] for s in range(0, 2001, 100)]
    assert all(a >= b for a, b in zip(taus, taus[1:]))


def test_codebook_usage():
    assert codebook_usage(torch.arange(8), 16) == {"perplexity": pytest.approx(8.0), "codes_used": 8}
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 16)["perplexity"] == pytest.approx(1.0)


def _train_briefly(kl_weight, steps):
    from dalle_fast.data.shapes import ShapesDataset
    torch.manual_seed(0)
    # K = 128: the 32x32 shapes data has only a few hundred distinct 4x4 patches per 64 images, so a
    # quarter of a 512-entry codebook would be close to one code per distinct patch. The preset's tau schedule
    # keeps tau ~1: annealed to 1/16, near one-hot samples leave 22-47 codes in use by step 80 (seed, CPU ISA)
    cfg = DVAEConfig.preset("tiny", vocab_size=128, kl_warmup_steps=30, kl_weight=kl_weight)
    m = DVAE(cfg)
    data = ShapesDataset(size=32, length=128, seed=0)
    images = torch.stack([data[i]["image"] for i in range(128)])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        out = m(images[torch.randint(0, 128, (16,), generator=gen)], step=step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    m.eval()
    return m, images, losses, codebook_usage(m.encode(images[:64]), cfg.vocab_size)


def test_short_training_lowers_loss_and_uses_codebook():
    m, images, losses, usage = _train_briefly(kl_weight=6.6, steps=80)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # nats per dimension
    assert usage["codes_used"] > m.config.vocab_size // 4, usage
    assert usage["perplexity"] > 5, usage
    err = (m.decode(m.encode(images)) - images).abs().mean()
    assert err < 0.2, err
    # the KL term against the uniform prior is what keeps the codebook in use
    _, _, _, no_kl = _train_briefly(kl_weight=0.0, steps=40)
    assert no_kl["codes_used"] < usage["codes_used"] / 2, (no_kl, usage)


def test_openai_converter_equivalence():
    dall_e = pytest.importorskip("dall_e", reason="the 'dall-e' package (pip install --no-deps dall-e) is not installed")
    from dalle_fast.models.dvae_openai import from_openai
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    # the released weights have non-zero biases; randomise them so the test covers them
    for p in list(enc.parameters()) + list(dec.parameters()):
        if p.dim() == 1:
            p.data.normal_(std=0.1)
    m = from_openai(enc, dec, image_size=32).eval()
    assert m.config.n_hid == 64 and m.config.vocab_size == 512 and m.config.n_init == 32
    assert m.config.latent_size == 4
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref_logits = enc(dall_e.map_pixels(x))
        torch.testing.assert_close(m.logits(x), ref_logits, rtol=1e-5, atol=1e-5)
        codes = ref_logits.argmax(1)
        z = torch.nn.functional.one_hot(codes, 512).permute(0, 3, 1, 2).float()
        ref_stats = dec(z).float()
        torch.testing.assert_close(m.decoder(z), ref_stats, rtol=1e-5, atol=1e-5)
        ref_img = dall_e.unmap_pixels(torch.sigmoid(ref_stats[:, :3]))
        torch.testing.assert_close(m.decode(m.encode(x)), ref_img, rtol=1e-5, atol=1e-5)


def test_openai_converter_paper_sizes():
    """The released model's sizes (n_hid 256, 2 blocks per group, K 8192), run on a small input."""
    dall_e = pytest.importorskip("dall_e", reason="the 'dall-e' package (pip install --no-deps dall-e) is not installed")
    from dalle_fast.models.dvae_openai import from_openai
    torch.manual_seed(1)
    enc, dec = dall_e.Encoder(), dall_e.Decoder()
    m = from_openai(enc, dec, image_size=32).eval()
    paper = DVAEConfig.preset("paper")
    assert m.config == DVAEConfig.preset("paper", image_size=32)
    assert m.config.vocab_size == paper.vocab_size == 8192
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        logits = enc(dall_e.map_pixels(x))
        torch.testing.assert_close(m.logits(x), logits, rtol=1e-4, atol=1e-4)
        codes = logits.argmax(1)
        ref = dall_e.unmap_pixels(torch.sigmoid(dec(torch.nn.functional.one_hot(codes, 8192).permute(0, 3, 1, 2).float())[:, :3]))
        torch.testing.assert_close(m.decode(codes), ref, rtol=1e-4, atol=1e-4)


def test_openai_converter_rejects_foreign_state_dict():
    from dalle_fast.models.dvae_openai import from_openai
    with pytest.raises(ValueError, match="missing"):
        from_openai({"foo": torch.zeros(1)}, {"bar": torch.zeros(1)})


def test_encode_casts_images_to_the_model_dtype():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.rand(2, 3, 32, 32)
    codes = m.encode(x)
    assert torch.equal(m.encode(x.double()), codes)  # float64 images into a float32 model
    mb = tiny().to(torch.bfloat16).eval()
    assert torch.equal(mb.encode(x), mb.encode(x.bfloat16()))  # float32 images into a bf16 model
    assert mb.logits(x).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_trains_a_low_precision_model(dtype):
    torch.manual_seed(0)
    m = tiny().to(dtype)
    x = torch.rand(2, 3, 32, 32)
    for images in (x, x.to(dtype)):
        out = m(images, step=3)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        assert m.encoder.blocks.input.weight.grad is not None and m.decoder.blocks.input.weight.grad is not None
        m.zero_grad()


def test_forward_rejects_an_empty_batch():
    m = tiny()
    with pytest.raises(ValueError, match="images.*batch size 0"):
        m(torch.rand(0, 3, 32, 32), step=0)
    assert m.encode(torch.rand(0, 3, 32, 32)).shape == (0, 8, 8)  # inference on an empty batch is fine


@pytest.mark.parametrize("field, value", [
    ("kl_weight", float("nan")), ("kl_weight", float("inf")), ("gaussian_sigma", float("inf")),
    ("tau_start", float("inf")), ("diversity_weight", float("nan")), ("tau_end", True),
    ("channels", True), ("group_count", True),
    ("tau_anneal_steps", -1), ("kl_warmup_steps", 2.5), ("tau_anneal_steps", None),
])
def test_config_rejects_non_finite_bool_and_bad_step_counts(field, value):
    with pytest.raises(ValueError, match=field):
        DVAEConfig.preset("tiny", **{field: value})


def test_schedule_and_forward_reject_bad_steps():
    import numpy as np
    m = tiny()
    assert m.schedule(np.int64(7)) == m.schedule(torch.tensor(7)) == m.schedule(7)
    for step in (-1, 2.5, True, "3", None):
        with pytest.raises(ValueError, match="step"):
            m.schedule(step)
    with pytest.raises(ValueError, match="step"):
        m(torch.rand(1, 3, 32, 32), step=-10)


def _openai_state_dicts(**cfg):
    """dall_e-format (``w``/``b``) state dicts of a random group_count=4 DVAE (no dall_e needed)."""
    m = DVAE(DVAEConfig(image_size=32, group_count=4, **cfg))

    def rename(sd):
        return {k.rsplit(".", 1)[0] + (".w" if k.endswith("weight") else ".b"): v for k, v in sd.items()}
    return rename(m.encoder.state_dict()), rename(m.decoder.state_dict())


def test_openai_converter_refuses_mismatched_decoder_and_size_overrides():
    from dalle_fast.models.dvae_openai import from_openai
    enc, dec = _openai_state_dicts(vocab_size=16, n_hid=8, n_init=8, n_blk_per_group=1)
    m = from_openai(enc, dec, image_size=32, likelihood="gaussian")  # training fields may be overridden
    assert m.config.likelihood == "gaussian" and m.config.n_hid == 8
    _, dec_wide = _openai_state_dicts(vocab_size=16, n_hid=16, n_init=8, n_blk_per_group=1)
    with pytest.raises(ValueError, match="n_hid"):
        from_openai(enc, dec_wide, image_size=32)
    _, dec_deep = _openai_state_dicts(vocab_size=16, n_hid=8, n_init=8, n_blk_per_group=2)
    with pytest.raises(ValueError, match="n_blk_per_group"):
        from_openai(enc, dec_deep, image_size=32)
    with pytest.raises(ValueError, match="vocab_size"):
        from_openai(enc, dec, image_size=32, vocab_size=32)
    no_group_4 = {k: v for k, v in enc.items() if "group_4" not in k}
    with pytest.raises(ValueError, match="encoder"):
        from_openai(no_group_4, dec, image_size=32)
