"""DALL-E transformer: config, loss, masks through the model, caption dropout, checkpoints, exact resume."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dalle_fast import checkpoint as ck
from dalle_fast import paper_schedule
from dalle_fast.models.dalle import DALLE, DALLEConfig
from dalle_fast.train import TrainConfig, Trainer, dalle_loss

torch.set_num_threads(1)
KINDS7 = ("full", "row", "col", "conv", "axial_row", "axial_col", "conv_like")


def micro(**kw):
    base = dict(text_vocab=40, image_vocab=24, text_len=5, image_size=4, dim=32, depth=2, heads=2, dim_head=16,
                conv_kernel_size=3, conv_like_kernel_size=2)
    return DALLEConfig(**{**base, **kw})


def test_presets_and_validation():
    tiny, small, paper = (DALLEConfig.preset(n) for n in ("tiny", "small", "paper"))
    assert (paper.depth, paper.heads, paper.dim_head, paper.text_len, paper.image_size) == (64, 62, 64, 256, 32)
    assert small.seq_len == 256 + 32 * 32
    assert paper.layer_kinds() == tuple(paper_schedule(64))
    assert tiny.pad_base + tiny.text_len - 1 == tiny.text_vocab and tiny.bos_id == tiny.pad_base - 1
    over = DALLEConfig.preset("tiny", text_vocab=100)  # derived ids follow an overridden vocabulary
    assert over.pad_base == 100 - (over.text_len - 1)
    assert DALLEConfig(**dataclasses.asdict(micro(kinds=KINDS7[:2]))) == micro(kinds=KINDS7[:2])  # JSON round trip
    with pytest.raises(ValueError, match="kinds"):
        micro(kinds=("row",))
    with pytest.raises(ValueError, match="kinds"):
        micro(kinds=("row", "diagonal"))
    with pytest.raises(ValueError, match="preset"):
        DALLEConfig.preset("huge")
    with pytest.raises(ValueError, match="pad_base"):
        micro(pad_base=39)
    m = DALLE(micro())
    with pytest.raises(ValueError, match="text"):
        m.logits(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="codes"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4, 4), 24))


def test_loss_is_weighted_text_and_image_cross_entropy():
    torch.manual_seed(0)
    m = DALLE(micro()).eval()
    text, codes = torch.randint(0, 35, (3, 4)), torch.randint(0, 24, (3, 4, 4))
    out = m(text, codes)
    logits = m.logits(text, codes.flatten(1)[:, :-1])  # (3, 5 + 15, 64)
    assert logits.shape == (3, 20, 64)
    text_ce = F.cross_entropy(logits[:, :4, :40].flatten(0, 1), text.flatten())
    image_ce = F.cross_entropy(logits[:, 4:, 40:].flatten(0, 1), codes.flatten())
    torch.testing.assert_close(out["text_loss"], text_ce)
    torch.testing.assert_close(out["image_loss"], image_ce)
    torch.testing.assert_close(out["loss"], text_ce / 8 + 7 * image_ce / 8)


@pytest.mark.parametrize("kind", KINDS7)
def test_model_respects_the_layer_mask(kind):
    """Changing image code j changes exactly the logits the layer's mask lets it reach (one layer)."""
    torch.manual_seed(1)
    cfg = micro(depth=1, kinds=(kind,))
    m = DALLE(cfg).eval()
    layout = cfg.layouts()[0]
    text, codes = torch.randint(0, 35, (1, 4)), torch.randint(0, 24, (1, 16))
    base = m.logits(text, codes)
    for j in (0, 5, 10):
        other = codes.clone()
        other[0, j] = (other[0, j] + 1) % 24
        changed = (m.logits(text, other) - base).abs().amax(-1)[0] > 1e-6  # (T + 16,)
        pos = cfg.text_len + j
        reach = layout.dense_mask()[:, pos]  # queries that may read key `pos`
        assert torch.equal(changed, reach), (kind, j)


def test_caption_dropout():
    m = DALLE(micro(caption_dropout=0.5))
    text = torch.randint(0, 35, (200, 4))
    torch.manual_seed(3)
    dropped = m.drop_captions(text, 0.5)
    is_null = (dropped == m.null_text(1)).all(1)
    assert 60 < int(is_null.sum()) < 140 and torch.equal(dropped[~is_null], text[~is_null])
    assert torch.equal(m.null_text(2)[0], torch.arange(m.config.pad_base, m.config.pad_base + 4))
    codes = torch.randint(0, 24, (200, 16))
    m.eval()
    a = m(text, codes)["loss"]
    assert torch.equal(a, m(text, codes)["loss"])  # eval: no dropout
    m.train()
    torch.manual_seed(4)
    b = m(text, codes)["loss"]
    assert not torch.allclose(a, b)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n, cfg, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.text = torch.randint(0, cfg.pad_base - 1, (n, cfg.text_len - 1), generator=g)
        self.codes = torch.randint(0, cfg.image_vocab, (n, cfg.image_size, cfg.image_size), generator=g)

    def __len__(self):
        return len(self.text)

    def __getitem__(self, i):
        return {"text_ids": self.text[i], "codes": self.codes[i]}


def _trainer(out, steps, cfg):
    torch.manual_seed(5)
    tc = TrainConfig(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, progress=False, seed=3, log_every=1,
                     checkpoint_every=2)
    return Trainer(DALLE(cfg), dalle_loss, _Pairs(10, cfg), tc, out, model_type="dalle", model_config=cfg,
                   device="cpu")


def test_exact_resume_and_load_model(tmp_path):
    cfg = micro(caption_dropout=0.3)  # dropout draws from the RNG the checkpoint restores
    straight = _trainer(tmp_path / "a", 6, cfg)
    straight.fit()
    half = _trainer(tmp_path / "b", 3, cfg)
    half.fit()
    resumed = _trainer(tmp_path / "b", 6, cfg)
    resumed.fit(resume="auto")
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    loaded = ck.load_model(tmp_path / "a")
    assert isinstance(loaded, DALLE) and loaded.config == cfg
    for a, b in zip(loaded.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)


def test_vocab_slice_cross_entropy_equals_the_masked_full_softmax():
    from dalle_fast.nn.functional import vocab_slice_cross_entropy
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20).double()
    h = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 8, (3, 5))
    loss = vocab_slice_cross_entropy(h, head, 7, 15, target)
    grads = torch.autograd.grad(loss, (h, head.weight, head.bias))
    logits = head(h)
    keep = torch.zeros(20, dtype=torch.bool)
    keep[7:15] = True
    masked = logits.masked_fill(~keep, -torch.finfo(torch.float64).max)
    ref = torch.nn.functional.cross_entropy(masked.flatten(0, 1), (target + 7).flatten())
    torch.testing.assert_close(loss, ref)
    for ours, theirs in zip(grads, torch.autograd.grad(ref, (h, head.weight, head.bias))):
        torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="target"):
        vocab_slice_cross_entropy(h, head, 7, 15, target[:, :4])
    for lo, hi in ((-5, 15), (7, 21), (15, 7), (7, 7), (7.0, 15), (True, 15)):
        with pytest.raises(ValueError, match="lo|hi"):
            vocab_slice_cross_entropy(h, head, lo, hi, target)
    for bad in (8, -1):  # a target outside [0, hi - lo)
        with pytest.raises(ValueError, match="target ids"):
            vocab_slice_cross_entropy(h, head, 7, 15, target.masked_fill(target == target[0, 0], bad))


def test_text_and_codes_must_have_the_same_batch():
    m = DALLE(micro())
    text = torch.randint(0, 35, (2, 4))
    with pytest.raises(ValueError, match="rows"):
        m.logits(text, torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="rows"):
        m(text, torch.zeros(3, 4, 4, dtype=torch.long))


def test_config_refuses_ids_and_weights_of_the_wrong_type():
    for name, value in (("bos_id", 3.5), ("bos_id", True), ("pad_base", 3.0), ("pad_base", "3"),
                        ("caption_dropout", "0.1"), ("caption_dropout", None), ("text_loss_weight", "0.5")):
        with pytest.raises(ValueError, match=name):
            micro(**{name: value})
    assert micro(bos_id=3, pad_base=4, caption_dropout=0, text_loss_weight=1).bos_id == 3


def test_empty_batch_with_codes():
    m = DALLE(micro()).eval()
    text = torch.zeros(0, 4, dtype=torch.long)  # no reshape(0, -1) of the codes (which cannot infer -1)
    assert m.logits(text, torch.zeros(0, 3, dtype=torch.long)).shape == (0, 8, 64)
    assert m.logits(text, torch.zeros(0, 4, 4, dtype=torch.long)).shape == (0, 21, 64)
    assert m.flat_codes(torch.zeros(0, 4, 4, dtype=torch.long)).shape == (0, 16)
