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
