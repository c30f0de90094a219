"""Tokenizers: a built-in byte-level tokenizer and local Hugging Face tokenizers.

Every tokenizer here exposes the same small interface used by preprocessing, the trainer and
evaluation: ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size`` and ``eod``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eod: int
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-document 256, padding 257 (vocab 258).

    Needs no files, so the smoke run and tests work on any machine.
    """

    name = "byte"

    def __init__(self) -> None:
        self.eod = 256
        self.pad = 257
        self.vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (no hub downloads)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        if not Path(path).exists():
            raise FileNotFoundError(
                f"tokenizer path {path!r} does not exist; give a local directory holding a "
                "Hugging Face tokenizer (tokenizer.json or tokenizer_config.json) or 'byte'"
            )
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.name = str(path)
        self.vocab_size = len(self._tok)
        eod = self._tok.eos_token_id
        if eod is None:
            raise ValueError(f"tokenizer {path!r} defines no eos token to use as end-of-document")
        self.eod = int(eod)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def get_tokenizer(name_or_path: str | None = None) -> Tokenizer:
    """``None`` or ``"byte"`` gives the built-in byte tokenizer; anything else is a local HF path."""
    if name_or_path in (None, "", "byte"):
        return ByteTokenizer()
    return HFTokenizer(name_or_path)
