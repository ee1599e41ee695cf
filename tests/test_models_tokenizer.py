"""BPE tokenizer: roundtrip, truncation report, per-position padding, save/load."""
import json
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dalle_fast.data.shapes import ShapesDataset
from dalle_fast.tokenizer import Tokenizer, TruncationWarning

CORPUS = ShapesDataset(length=300, seed=0).captions() + [
    "The quick brown fox jumps over the lazy dog.", "An armchair in the shape of an avocado.",
    "A painting of a cat wearing a hat, in the style of van Gogh!"] * 5
_TOK = Tokenizer.train(CORPUS, vocab_size=600, text_len=32)


@pytest.fixture(scope="module")
def tok():
    return _TOK


def test_layout(tok):
    assert tok.bos_id == tok.pad_base - 1
    assert tok.vocab_size == tok.pad_base + 32
    assert tok.vocab_size <= 600
    # the corpus is rich enough to learn merges: common words become one token
    assert len(tok.tokenize(["a small red circle"])[0]) <= 5


def test_padding_tokens_are_per_position(tok):
    ids = tok.encode(["a red circle", "a large blue square to the left of a small green triangle"])
    assert ids.shape == (2, 32) and ids.dtype == torch.long
    n0 = len(tok.tokenize(["a red circle"])[0])
    assert ids[0, :n0].lt(tok.bos_id).all()
    assert ids[0, n0:].tolist() == [tok.pad_base + i for i in range(n0, 32)]
    assert tok.is_padding(ids)[0].sum() == 32 - n0
    assert ids.max() < tok.vocab_size


def test_lowercase_and_decode_skips_padding(tok):
    ids = tok.encode(["A Small RED Circle"])
    assert tok.decode(ids[0]) == "a small red circle"
    assert tok.decode(ids) == ["a small red circle"]
    assert tok.decode(torch.cat([torch.tensor([tok.bos_id]), ids[0]])) == "a small red circle"


def test_truncation_is_reported(tok):
    long = " ".join(["a small red circle above a large blue square"] * 10)
    texts = ["a red circle", long]
    ids, truncated = tok.encode(texts, return_truncated=True)
    assert truncated == [1]
    assert not tok.is_padding(ids[1]).any()
    assert ids[1].tolist() == tok.tokenize([long])[0][:32]
    with pytest.warns(TruncationWarning, match=r"1 of 2 .*indices \[1\]"):
        tok.encode(texts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(["a red circle"])  # nothing truncated: no warning


def test_shorter_text_len(tok):
    ids = tok.encode(["a red circle"], text_len=8)
    assert ids.shape == (1, 8)
    with pytest.raises(ValueError, match="text_len"):
        tok.encode(["a red circle"], text_len=33)


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        tok.encode(["a red circle", ""])
    with pytest.raises(ValueError, match=r"texts\[0\]"):
        tok.encode([3])
    with pytest.raises(ValueError, match="ids must lie"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(CORPUS, vocab_size=200, text_len=32)


def test_save_load_single_json(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]
    tok2 = Tokenizer.load(path)
    assert (tok2.vocab_size, tok2.bos_id, tok2.pad_base, tok2.text_len) == (tok.vocab_size, tok.bos_id, tok.pad_base, 32)
    texts = ["a small red circle above a large blue square", "Zebra ünïcödé 🦓"]
    assert torch.equal(tok2.encode(texts), tok.encode(texts))
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a dalle_fast tokenizer"):
        Tokenizer.load(bad)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=7))
def test_roundtrip_property(text):
    tok = _TOK
    ids, truncated = tok.encode([text], return_truncated=True)
    assert truncated == []  # at most 7 chars x 4 bytes < 32 tokens
    assert tok.decode(ids[0]) == tok.normalize(text)


def test_decode_empty(tok):
    assert tok.decode([]) == ""
    assert tok.decode(torch.empty(0, dtype=torch.long)) == ""
    assert tok.decode(torch.empty(2, 0, dtype=torch.long)) == ["", ""]
    assert tok.decode(torch.empty(0, 5, dtype=torch.long)) == []
    assert tok.decode([[]]) == [""]


def test_train_checks_argument_types_first():
    for kwargs, name in [({"vocab_size": "600"}, "vocab_size"), ({"vocab_size": 600.0}, "vocab_size"),
                         ({"text_len": "32"}, "text_len"), ({"min_frequency": "2"}, "min_frequency"),
                         ({"min_frequency": -1}, "min_frequency")]:
        with pytest.raises(ValueError, match=name):
            Tokenizer.train(CORPUS, **{"vocab_size": 600, "text_len": 32, **kwargs})
    with pytest.raises(ValueError, match="texts"):
        Tokenizer.train("a red circle", vocab_size=600, text_len=32)  # a str, not a list of str
    with pytest.raises(ValueError, match="texts"):
        Tokenizer.train(None, vocab_size=600, text_len=32)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        Tokenizer.train(["a red circle", 3], vocab_size=600, text_len=32)


def test_load_errors_name_the_path(tok, tmp_path):
    good = tmp_path / "tok.json"
    tok.save(good)
    payload = json.loads(good.read_text())
    cases = {"missing.json": None, "corrupt.json": "{not json", "binary.json": b"\xff\xfe\x00",
             "no_bpe.json": json.dumps({k: v for k, v in payload.items() if k != "bpe"}),
             "no_text_len.json": json.dumps({k: v for k, v in payload.items() if k != "text_len"}),
             "bad_text_len.json": json.dumps({**payload, "text_len": "32"}),
             "bad_bpe.json": json.dumps({**payload, "bpe": {"model": 1}})}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(repr(str(path)))):
            Tokenizer.load(path)
    with pytest.raises(ValueError, match="missing.*does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="JSON"):
        Tokenizer.load(tmp_path / "corrupt.json")
    with pytest.raises(ValueError, match="'bpe'"):
        Tokenizer.load(tmp_path / "no_bpe.json")
    with pytest.raises(ValueError, match="text_len"):
        Tokenizer.load(tmp_path / "bad_text_len.json")
    with pytest.raises(ValueError, match="is a directory|cannot be read"):
        Tokenizer.load(tmp_path)
