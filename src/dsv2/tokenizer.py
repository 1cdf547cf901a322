"""Tokenizers: DeepSeek's byte-level BPE `tokenizer.json` (via HF `tokenizers`), the chat template, and
a byte-level fallback so randomly initialised presets can be run end to end.

BOS/EOS ids come from the model config, and BOS is prepended here rather than by the tokenizer's
post-processor, so it is added exactly once whatever the file says (reference-spec §12).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dsv2.atomic import atomic_path, write_text_atomic
from dsv2.config import ModelConfig

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# DeepSeek-V2-Chat's template (reference-spec §12), for transformers' apply_chat_template; `_chat` is its twin
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


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
        """`tokenizer.json`, and the `tokenizer_config.json` that lets transformers' AutoTokenizer load it with
        the chat template and BOS/EOS (what lm-evaluation-harness and other clients tokenise with)."""
        hf = self.hf
        if hf.post_processor is None and self.bos_id is not None:  # so that `AutoTokenizer(text)` adds BOS too
            hf = HFTokenizer.from_str(hf.to_str())
            bos = hf.id_to_token(self.bos_id)
            hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                              special_tokens=[(bos, self.bos_id)])
        with atomic_path(Path(folder) / TOKENIZER_FILE) as tmp:
            hf.save(str(tmp))
        write_text_atomic(Path(folder) / TOKENIZER_CONFIG_FILE, json.dumps(self.hf_config(), indent=1))

    def hf_config(self) -> dict[str, object]:
        """transformers' tokenizer_config.json: the generic fast tokenizer over tokenizer.json (DeepSeek's own
        says LlamaTokenizerFast, which transformers 5 may rebuild with a SentencePiece pre-tokenizer,
        reference-spec §12), BOS added to every encoding as dsv2's `encode` does, and the chat template."""
        def text(token_id: int | None) -> str | None:
            return None if token_id is None else self.hf.id_to_token(token_id)

        return {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": text(self.bos_id),
            "eos_token": text(self.eos_id), "pad_token": text(self.eos_id), "unk_token": None,
            "add_bos_token": self.bos_id is not None, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens spelled out (a piece of a UTF-8 character reads U+FFFD)."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """DeepSeek-V2-Chat's template: BOS, then per message a system prompt as `…\\n\\n`, `User: …\\n\\n` or
        `Assistant: …<EOS>`; with `add_generation_prompt`, a final `Assistant:` for the model to continue.

        The ids are those of the whole rendered conversation encoded at once (a BPE merges across the pieces),
        with the EOS ids put in by id: the text between them is encoded with special tokens read as plain text,
        so a message that spells out the EOS (or BOS) string cannot end (or start) a turn.
        """
        return self._chat(messages, add_generation_prompt)[0]

    def encode_chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """The ids of the whole conversation (no generation prompt) and a target mask: True exactly for the tokens
        of each assistant reply (the text after `Assistant:`, i.e. " " + content) and its EOS.

        A token is a target if it holds any character of a reply, found from the tokens' character offsets. A
        token straddling the boundary (`:` merged with the reply's first characters) is therefore a target,
        and `apply_chat_template(messages[:k])` is then no longer a prefix of these ids. Byte-level BPEs such as
        DeepSeek's and `train_bpe`'s cannot do that: their pre-tokenizer cuts between `:` and the space after it.
        The end of a reply never straddles, as its EOS is a separate id.
        """
        return self._chat(messages, add_generation_prompt=False)

    def _chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
        messages = check_messages(messages)
        if self.eos_id is None and any(m["role"] == "assistant" for m in messages):
            raise TokenizerError("the tokenizer has no EOS id, which ends every assistant turn")
        ids = [] if self.bos_id is None else [self.bos_id]
        mask = [False] * len(ids)

        def add(text: str, reply_start: int) -> None:
            """Encode `text` (no EOS inside); its tokens ending after character `reply_start` are targets."""
            encoding = self._chat_hf.encode(text, add_special_tokens=False)
            ids.extend(encoding.ids)
            mask.extend(end > reply_start for _, end in encoding.offsets)

        text = ""  # rendered since the last EOS
        for m in messages:
            if m["role"] == "system":
                text += m["content"] + "\n\n"
            elif m["role"] == "user":
                text += f"User: {m['content']}\n\n"
            else:
                text += "Assistant:"
                add(f"{text} {m['content']}", reply_start=len(text))
                ids.append(self.eos_id)
                mask.append(True)
                text = ""
        if add_generation_prompt:
            text += "Assistant:"
        add(text, reply_start=len(text))
        return ids, mask

    @functools.cached_property
    def _chat_hf(self) -> HFTokenizer:
        """A copy of `hf` for the chat template: special tokens in the text are encoded as text, and no
        post-processor (which adds nothing without special tokens), so the offsets are exactly each token's
        characters: `trim_offsets` would turn whitespace-only tokens into empty ranges placed as it chooses."""
        hf = HFTokenizer.from_str(self.hf.to_str())
        hf.post_processor = None
        hf.encode_special_tokens = True
        return hf


def check_messages(messages: object) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts, keys other than those two dropped; TokenizerError naming
    the first bad message otherwise (role must be system, user or assistant, content a string)."""
    if not isinstance(messages, list):
        raise TokenizerError(f"messages must be a list of messages, got {type(messages).__name__}")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TokenizerError(f"messages[{i}].role must be system, user or assistant, got {role!r}")
        if not isinstance(content, str):
            raise TokenizerError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


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
