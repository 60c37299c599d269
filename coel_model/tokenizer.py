"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on the corpus training split.

A thin wrapper so the rest of CoEL sees `encode(text) -> ids`, `decode(ids) -> text` and `eos_id`,
and never the `tokenizers` API. Byte-level means every string round-trips exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from coel_model.corpus import EOS_TEXT
from coel_model.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


# document separators tried in order when no eos id is given (ours first, then HF conventions)
EOS_CANDIDATES = (EOS_TEXT, "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>")


class Tokenizer:
    def __init__(self, hf: HFTokenizer, eos_id: int | None = None):
        self.hf = hf
        if eos_id is None:
            found = [hf.token_to_id(t) for t in EOS_CANDIDATES if hf.token_to_id(t) is not None]
            if not found:
                raise CheckpointError(f"tokenizer has none of the end-of-text tokens {list(EOS_CANDIDATES)}")
            eos_id = found[0]
        self.eos_id: int = eos_id

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def encode_documents(self, texts: list[str]) -> list[int]:
        """One token stream: each document followed by EOS (how training and eval see text)."""
        out: list[int] = []
        for ids in self.encode_batch(texts):
            out.extend(ids)
            out.append(self.eos_id)
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        self.hf.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.exists():
            raise CheckpointError(f"{path}: tokenizer file not found (train one with `coel train`)")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"{path}: unreadable tokenizer: {exc}") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE with EOS as token 0; deterministic for a given text order."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
