"""CLIP reranker: shapes of scores, input checks, learns to rank matching pairs first."""
import pytest
import torch

from dalle_fast.data.shapes import ShapesDataset
from dalle_fast.models.clip import CLIP, CLIPConfig
from dalle_fast.tokenizer import Tokenizer
from dalle_fast.train import TokenizingCollate, TrainConfig, train_clip

torch.set_num_threads(1)
DATA = ShapesDataset(size=32, length=256, seed=0, max_shapes=1)
TOK = Tokenizer.train(DATA.captions(), vocab_size=400, text_len=16)


def test_config_and_checks():
    cfg = CLIPConfig.for_tokenizer(TOK, "tiny")
    assert (cfg.vocab_size, cfg.pad_base, cfg.text_len) == (TOK.vocab_size, TOK.pad_base, 16)
    with pytest.raises(ValueError, match="patch_size"):
        CLIPConfig.preset("tiny", patch_size=5)
    for name, value in (("init_temperature", 0.0), ("init_temperature", -1.0), ("max_logit_scale", -1.0),
                        ("max_logit_scale", float("inf")), ("init_temperature", True)):
        with pytest.raises(ValueError, match=name):
            CLIPConfig.preset("tiny", **{name: value})
    m = CLIP(cfg)
    ids = TOK.encode(["a small red circle in the center"] * 2)
    with pytest.raises(ValueError, match="images"):
        m.score(ids, torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="text_ids"):
        m.score(ids[:, :8], torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="text_ids must lie"):
        m.score(torch.full((2, 16), TOK.vocab_size), torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="rows"):
        m.score(ids, torch.rand(3, 3, 32, 32))


def test_scores_are_cosines_and_ignore_padding_ids():
    torch.manual_seed(0)
    m = CLIP(CLIPConfig.for_tokenizer(TOK, "tiny")).eval()
    ids = TOK.encode(["a small red circle in the center", "a large blue square on the left", "a green triangle at the top"])
    imgs = torch.rand(4, 3, 32, 32)
    mat = m.score_matrix(ids, imgs)
    assert mat.shape == (3, 4) and mat.abs().max() <= 1 + 1e-5
    # the cosines of the two towers' raw features (not just some numbers within [-1, 1])
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(m.text(ids)[:, None], m.image(imgs)[None], dim=-1)
    torch.testing.assert_close(mat, cos)
    torch.testing.assert_close(m.score(ids, imgs[:3]), mat.diagonal()[:3])
    # padding positions are masked: their embedding rows do not influence the text features
    before = m.encode_text(ids)
    with torch.no_grad():
        m.text.token.weight[TOK.pad_base:] += 5.0
    torch.testing.assert_close(m.encode_text(ids), before)


def test_clip_learns_to_rank_matching_pairs():
    cfg = CLIPConfig.for_tokenizer(TOK, "tiny")
    tc = TrainConfig(steps=120, batch_size=32, lr=2e-3, warmup_steps=10, checkpoint_every=1000, progress=False, seed=0)
    model = train_clip(cfg, TOK, tc, DATA, device="cpu").model.eval()
    # held-out scenes (other seed): the matching caption should beat the others
    test = ShapesDataset(size=32, length=32, seed=123, max_shapes=1)
    batch = TokenizingCollate(TOK)([test[i] for i in range(32)])
    sims = model.score_matrix(batch["text_ids"], batch["image"])
    top1 = (sims.argmax(1) == torch.arange(32)).float().mean().item()
    pair_wins = (sims.diagonal()[:, None] > sims).float().sum().item() / (32 * 31)
    print(f"pair_wins={pair_wins:.3f} top1={top1:.3f}")
    assert pair_wins > 0.85, pair_wins  # untrained ~0.5
    assert top1 > 0.25, top1  # chance 1/32


def test_images_out_of_range_or_nan_are_refused():
    m = CLIP(CLIPConfig.for_tokenizer(TOK, "tiny")).eval()
    ids = TOK.encode(["a small red circle in the center"] * 2)
    x = torch.rand(2, 3, 32, 32)
    for bad, match in ((x * 255, r"\[0, 1\]"), (x - 0.5, r"\[0, 1\]"), (torch.full_like(x, float("nan")), "NaN")):
        for call in (m.score, m.score_matrix, m):
            with pytest.raises(ValueError, match="images"):
                call(ids, bad)
        with pytest.raises(ValueError, match=match):
            m.encode_image(bad)


def test_images_are_cast_to_the_model_dtype():
    torch.manual_seed(0)
    ids = TOK.encode(["a small red circle in the center", "a large blue square on the left"])
    x = torch.rand(2, 3, 32, 32)
    m = CLIP(CLIPConfig.for_tokenizer(TOK, "tiny")).eval()
    torch.testing.assert_close(m.score(ids, x.double()), m.score(ids, x))
    # a bf16 reranker gets the dVAE's float32 decodes
    mb = CLIP(CLIPConfig.for_tokenizer(TOK, "tiny")).to(torch.bfloat16).eval()
    torch.testing.assert_close(mb.score(ids, x), mb.score(ids, x.bfloat16()))


def test_non_tensor_inputs_empty_training_batch_and_config_types_are_refused():
    m = CLIP(CLIPConfig.for_tokenizer(TOK, "tiny"))
    ids = TOK.encode(["a small red circle in the center"] * 2)
    x = torch.rand(2, 3, 32, 32)
    for call in (m.score, m):
        with pytest.raises(ValueError, match="text_ids"):
            call(ids.tolist(), x)
        with pytest.raises(ValueError, match="images"):
            call(ids, x.tolist())
    with pytest.raises(ValueError, match="batch size 0"):
        m(ids[:0], x[:0])
    assert m.score(ids[:0], x[:0]).shape == (0,)  # scoring nothing is fine
    for name, value in (("pad_base", 5.5), ("pad_base", True), ("width", True), ("heads", True)):
        with pytest.raises(ValueError, match=name):
            CLIPConfig.preset("tiny", **{name: value})
