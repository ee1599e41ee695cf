"""BPE text tokenizer for DALL-E captions, built on Hugging Face ``tokenizers``.

Byte-level BPE with NFC + lowercase normalisation, so every non-empty string (whitespace-only ones
included) is encodable and decoding gives back the normalised text exactly. The empty string
tokenizes to nothing and is refused with a ValueError. The id space is ``[0, vocab_size)``::

    [0, bpe_size)                        BPE tokens
    bos_id = bpe_size                    beginning-of-sequence token (for the transformer to prepend)
    [pad_base, pad_base + text_len)      per-position padding tokens: padding at position i is
                                         pad_base + i (the paper uses a distinct padding token for
                                         each of the 256 text positions)

BOS and padding live outside the BPE vocabulary, so no caption text can produce them. The tokenizer
(BPE model and the layout above) is saved as one JSON file.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

_FORMAT = "dalle_fast.tokenizer"
_BYTE_ALPHABET = 256


class TruncationWarning(UserWarning):
    """Some captions were longer than ``text_len`` tokens and were cut."""


class UnknownWordsWarning(UserWarning):
    """A caption holds words the tokenizer has no token for (see :meth:`Tokenizer.unknown_words`)."""


def _hf_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """Lower-cased byte-level BPE with per-position padding. Build with :meth:`train` or :meth:`load`."""

    def __init__(self, hf: HFTokenizer, text_len: int = 256) -> None:
        if not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be a positive int, got {text_len!r}")
        self._hf = hf
        self.text_len = text_len
        self.bos_id = hf.get_vocab_size()
        self.pad_base = self.bos_id + 1
        self.vocab_size = self.pad_base + text_len

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 16384, text_len: int = 256,
              min_frequency: int = 2) -> "Tokenizer":
        """Learn BPE merges from ``texts``. ``vocab_size`` counts everything (BPE tokens, BOS and the
        ``text_len`` padding tokens); a small corpus may yield fewer BPE tokens than requested, in
        which case :attr:`vocab_size` is smaller than asked."""
        if not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be a positive int, got {text_len!r}")
        if not isinstance(vocab_size, int) or vocab_size - 1 - text_len <= _BYTE_ALPHABET:
            raise ValueError(f"vocab_size must be an int above text_len + 1 + {_BYTE_ALPHABET} (byte alphabet) "
                             f"= {text_len + 1 + _BYTE_ALPHABET}, got {vocab_size!r}")
        if not isinstance(min_frequency, int) or min_frequency < 0:
            raise ValueError(f"min_frequency must be a non-negative int, got {min_frequency!r}")
        if isinstance(texts, str) or not isinstance(texts, Iterable):
            raise ValueError(f"texts must be an iterable of str, got {type(texts).__name__}")

        def checked() -> Iterable[str]:
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise ValueError(f"texts[{i}] must be a str, got {type(t).__name__}")
                yield t

        hf = _hf_tokenizer()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1 - text_len, min_frequency=min_frequency,
                                      show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[])
        hf.train_from_iterator(checked(), trainer=trainer)
        return cls(hf, text_len)

    def with_text_len(self, text_len: int) -> "Tokenizer":
        """The same BPE model with ``text_len`` positions (and so ``text_len`` padding tokens)."""
        return type(self)(self._hf, text_len)

    def fingerprint(self) -> str:
        """SHA-256 of the whole BPE model and the text length: tokenizers with the same sizes but
        other merges (which encode captions differently) differ here. What caches of encoded
        captions and checkpoints record to tell tokenizers apart."""
        return hashlib.sha256(f"{self._hf.to_str()}\n{self.text_len}".encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as a single JSON file."""
        payload = {"format": _FORMAT, "version": 1, "text_len": self.text_len, "bpe": json.loads(self._hf.to_str())}
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a file written by :meth:`save`. A missing, unreadable or damaged file raises ValueError."""
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"path {str(path)!r} does not exist") from None
        except OSError as err:
            raise ValueError(f"path {str(path)!r} cannot be read: {err}") from err
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"path {str(path)!r} is not valid JSON: {err}") from err
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"path {str(path)!r} is not a dalle_fast tokenizer file")
        missing = [key for key in ("text_len", "bpe") if key not in payload]
        if missing:
            raise ValueError(f"path {str(path)!r} is a damaged tokenizer file: "
                             f"no {', '.join(map(repr, missing))}")
        text_len = payload["text_len"]
        if not isinstance(text_len, int) or isinstance(text_len, bool) or text_len < 1:
            raise ValueError(f"path {str(path)!r} is a damaged tokenizer file: text_len {text_len!r} "
                             "is not a positive int")
        try:
            hf = HFTokenizer.from_str(json.dumps(payload["bpe"]))
        except Exception as err:  # tokenizers raises a bare Exception
            raise ValueError(f"path {str(path)!r} is a damaged tokenizer file: bad 'bpe' model: "
                             f"{err}") from err
        return cls(hf, text_len)

    # -- encoding ----------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """The normalised form of ``text`` (what :meth:`decode` gives back)."""
        return self._hf.normalizer.normalize_str(text)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded, untruncated BPE ids of each text."""
        if isinstance(texts, str):
            texts = [texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(t).__name__}")
        ids = [enc.ids for enc in self._hf.encode_batch(list(texts))]
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"texts[{i}] = {texts[i]!r} tokenizes to nothing")
        return ids

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` that have no token of their own in the BPE vocabulary (with or
        without a leading space) and are split into pieces: words the training captions did not
        hold often enough, so a model trained on them has not learned them."""
        unknown = []
        for piece, _ in self._hf.pre_tokenizer.pre_tokenize_str(self.normalize(text)):
            bare = piece.lstrip("\u0120")  # the byte-level alphabet's space
            if len(bare) > 1 and all(self._hf.token_to_id(p) is None for p in (bare, "\u0120" + bare)):
                word = self._hf.decoder.decode([bare])
                if word not in unknown:
                    unknown.append(word)
        return unknown

    def encode(self, texts: str | Sequence[str], text_len: int | None = None, *,
               return_truncated: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[int]]:
        """Captions -> ids (B, text_len) int64, padded with per-position tokens ``pad_base + i``.

        Captions longer than ``text_len`` tokens are cut. With ``return_truncated=True`` the indices
        of the cut captions are returned as well, ``(ids, truncated)``; otherwise a
        :class:`TruncationWarning` names them.
        """
        text_len = self.text_len if text_len is None else text_len
        if not isinstance(text_len, int) or not 1 <= text_len <= self.text_len:
            raise ValueError(f"text_len must be an int in [1, {self.text_len}], got {text_len!r}")
        rows = self.tokenize(texts)
        out = torch.arange(self.pad_base, self.pad_base + text_len, dtype=torch.long).repeat(len(rows), 1)
        truncated = []
        for b, row in enumerate(rows):
            if len(row) > text_len:
                truncated.append(b)
                row = row[:text_len]
            out[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        if return_truncated:
            return out, truncated
        if truncated:
            warnings.warn(f"{len(truncated)} of {len(rows)} captions exceed text_len={text_len} tokens and were "
                          f"truncated (indices {truncated[:10]}{'...' if len(truncated) > 10 else ''})",
                          TruncationWarning, stacklevel=2)
        return out

    def is_padding(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of padding positions, same shape as ``ids``."""
        return ids >= self.pad_base

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """ids (L,) -> str, or (B, L) -> list of str; BOS and padding tokens are skipped."""
        t = torch.as_tensor(ids, dtype=torch.long) if not isinstance(ids, torch.Tensor) else ids
        if t.dim() not in (1, 2):
            raise ValueError(f"ids must be 1-d or 2-d, got shape {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"ids must be integers, got {t.dtype}")
        if t.numel() and (t.min() < 0 or t.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range [{int(t.min())}, {int(t.max())}]")
        rows = t.tolist() if t.dim() == 2 else [t.tolist()]  # (0,) -> "", (0, L) -> [], (B, 0) -> [""] * B
        texts = [self._hf.decode([i for i in row if i < self.bos_id]) for row in rows]
        return texts[0] if t.dim() == 1 else texts

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, pad_base={self.pad_base}, text_len={self.text_len})"
