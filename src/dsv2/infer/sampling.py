"""Logits -> next token: penalties, logit bias, temperature, top-k, top-p, min-p, seeded sampling.

The order follows vLLM: penalise repeats (repetition penalty over prompt and output; OpenAI's presence and
frequency penalties over the output), add the logit bias, divide by the temperature, then restrict the
candidate set (top-k, then top-p, then min-p) and draw. Temperature 0 means greedy (of the penalised,
biased logits). Log-probabilities (`logprobs`, `prompt_logprobs`) are always those of the raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SamplingError(ValueError):
    """An invalid sampling parameter; the message names it."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    logprobs: int | None = None  # record each sampled token's log-probability, and the top n others' (0: none)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (given those before it)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted from a token's logit once per time it was generated
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]

    def __post_init__(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise SamplingError(f"sampling parameter `{name}`: {msg}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            fail("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            fail("temperature", f"must be >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            fail("top_k", f"must be an integer >= 1, or 0 / -1 for no limit, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            fail("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            fail("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", f"must be non-negative token ids, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                fail(name, f"must be an integer >= 0 or None, got {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                fail(name, f"must be in [-2, 2], got {value!r}")
        if self.logit_bias is not None:
            bias = self.logit_bias
            if not isinstance(bias, dict) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(b, (int, float))
                and not isinstance(b, bool) and -100 <= b <= 100 for t, b in bias.items()
            ):
                fail("logit_bias", f"must map token ids to biases in [-100, 100], got {bias!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            fail("seed", f"must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the raw logits: nothing changes them before the argmax."""
        return (self.greedy and self.repetition_penalty == 1.0 and self.presence_penalty == 0
                and self.frequency_penalty == 0 and not self.logit_bias)

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        g = torch.Generator(device)
        g.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return g


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style: a seen token's positive logit is divided by the penalty, a negative one multiplied."""
    if penalty == 1.0 or not seen:
        return logits
    seen = torch.tensor(seen, device=logits.device)
    picked = logits.gather(-1, seen)
    return logits.scatter(-1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))


def apply_openai_penalties(logits: torch.Tensor, generated: list[int], presence: float, frequency: float,
                           bias: dict[int, float] | None) -> torch.Tensor:
    """OpenAI's definition: logit[j] -= c[j] · frequency + (c[j] > 0) · presence, c[j] = times token j was
    generated so far; then logit[j] += bias[j]."""
    if generated and (presence or frequency):
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits = logits - counts * frequency - (counts > 0).to(logits.dtype) * presence
    if bias:
        ids = torch.tensor(list(bias), device=logits.device)
        logits = logits.index_add(-1, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device))
    return logits


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set every logit outside the top-k / top-p / min-p candidate set to -inf (last dim = vocab)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the first always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, seen: list[int], prompt_len: int,
           generator: torch.Generator) -> int:
    """One row: logits [vocab] (any float dtype), the ids seen so far (the first `prompt_len` the prompt's),
    the row's generator -> token id."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    logits = apply_openai_penalties(logits, seen[prompt_len:], params.presence_penalty, params.frequency_penalty,
                                    params.logit_bias)
    if params.greedy:
        return int(logits.argmax())
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
