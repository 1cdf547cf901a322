"""OpenAI-compatible request and response bodies (the subset dsv2 serves), as pydantic models.

Requests are validated here, at the border: a wrong type or a value out of range becomes a 400 with
OpenAI's error body naming the parameter (`api.py`). Every field OpenAI defines is either honoured or
refused: those dsv2 cannot honour are listed in each body's `UNSUPPORTED` with the values it can (their
defaults, which clients send routinely), and any other value gets a 400 naming the field. Fields that
only label a request (`user`, `metadata`, ...) change nothing OpenAI would do either, so they are taken.
Fields nobody defines are ignored (extensions of other servers, such as vLLM's `top_k`, are honoured).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits on alternatives per token
MAX_CHAT_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None  # token id (a string in JSON) -> bias in [-100, 100]
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extension; 0 / -1 = off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    # field -> the values of it dsv2 honours (a request giving any other is refused, naming the field)
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stop)}")
        return stop


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt, generate nothing
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {"suffix": (None, "")}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
        "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
        "prediction": (None,), "store": (None, False), "reasoning_effort": (None,), "web_search_options": (None,),
        "service_tier": (None, "auto", "default"),
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------------------- log-probabilities
def completion_logprobs(tokens: list[str], logprobs: list[float | None], top: list[dict[str, float] | None],
                        offset: int) -> dict[str, Any]:
    """OpenAI's legacy completion format: per token its text, log p (None for a prompt's first token, which
    has no context), {text: log p} of the alternatives asked for plus the token itself, and the offset of
    its text in the response text (each token's own text, one after another from `offset`)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float], top: list[list[tuple[str, float]]]) -> dict[str, Any]:
    """OpenAI's chat format: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in alts]}
                        for t, lp, alts in zip(tokens, logprobs, top, strict=True)], "refusal": None}
