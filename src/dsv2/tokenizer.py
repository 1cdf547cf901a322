"""Tokenizers: DeepSeek's byte-level BPE `tokenizer.json` (via HF `tokenizers`), the chat template, and
a byte-level fallback so randomly initialised presets can be run end to end.

BOS/EOS ids come from the model config, and BOS is prepended here rather than by the tokenizer's
post-processor, so it is added exactly once whatever the file says (reference-spec §12).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv2.atomic import atomic_path
from dsv2.config import ModelConfig

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, bos_id: int | None, eos_id: int | None):
        self.hf = tokenizer
        self.bos_id, self.eos_id = bos_id, eos_id

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, config: ModelConfig) -> Tokenizer:
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"{folder}: no {TOKENIZER_FILE}; a model folder needs one to turn text into tokens")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: not a valid tokenizer file ({e})") from None
        return cls(hf, config.bos_token_id, _first(config.eos_token_id))

    @classmethod
    def byte_level(cls, config: ModelConfig) -> Tokenizer:
        """No merges: BOS and EOS take their config ids, the 256 bytes fill the first free ids."""
        specials = {config.bos_token_id: "<|begin_of_text|>", _first(config.eos_token_id): "<|end_of_text|>"}
        specials = {i: s for i, s in specials.items() if i is not None}
        free = [i for i in range(config.vocab_size) if i not in specials]
        if len(free) < 256:
            raise TokenizerError(f"vocab_size {config.vocab_size} is too small for a byte-level tokenizer")
        vocab = dict(zip(sorted(pre_tokenizers.ByteLevel.alphabet()), free, strict=False))  # deterministic ids
        vocab.update({s: i for i, s in specials.items()})
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        _byte_level_pipeline(hf)
        hf.add_special_tokens(list(specials.values()))
        return cls(hf, config.bos_token_id, _first(config.eos_token_id))

    def save(self, folder: str | os.PathLike) -> None:
        with atomic_path(Path(folder) / TOKENIZER_FILE) as tmp:
            self.hf.save(str(tmp))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """DeepSeek-V2-Chat's template: BOS, then `User: …\\n\\n`, `Assistant: …<EOS>`, a system message
        as `…\\n\\n`; with `add_generation_prompt`, a final `Assistant:`."""
        ids = [] if self.bos_id is None else [self.bos_id]
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if not isinstance(content, str):
                raise TokenizerError(f"messages[{i}].content must be a string")
            if role == "system":
                ids += self.encode(content + "\n\n", add_bos=False)
            elif role == "user":
                ids += self.encode(f"User: {content}\n\n", add_bos=False)
            elif role == "assistant":
                ids += self.encode(f"Assistant: {content}", add_bos=False) + [self.eos_id]
            else:
                raise TokenizerError(f"messages[{i}].role must be system, user or assistant, got {role!r}")
        if add_generation_prompt:
            ids += self.encode("Assistant:", add_bos=False)
        return ids


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> HFTokenizer:
    """Byte-level BPE (DeepSeek's tokenizer family): special tokens take ids 0.., then the 256 bytes."""
    hf = HFTokenizer(models.BPE())
    _byte_level_pipeline(hf)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return hf


def _byte_level_pipeline(hf: HFTokenizer) -> None:
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()


def _first(ids: int | list[int] | None) -> int | None:
    return ids[0] if isinstance(ids, list) else ids
