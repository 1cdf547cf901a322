"""LLM: batched generation over the latent cache, with a vLLM-like API.

    llm = LLM("path/to/model", dtype="bfloat16")
    outputs = llm.generate(["Hello", [100000, 1, 2]], SamplingParams(max_tokens=32, temperature=0))
    for event in llm.stream(["Hello"], SamplingParams(max_tokens=32)): print(event.text_delta, end="")

Each step: free cache slots are filled with waiting requests (their prompts prefilled together, right
padded), then every active request decodes one token in a single batched forward through the absorbed
MLA path, then finished requests leave and the last active slot moves into the hole, so active slots
are always [0, n). The cache holds only latents; its bytes are reported by `stats()`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv2.config import PRESETS
from dsv2.infer.cache import LatentCache
from dsv2.infer.sampling import SamplingError, SamplingParams, sample
from dsv2.model import Transformer
from dsv2.tokenizer import Tokenizer
from dsv2.weights import load_model

Prompt = str | Sequence[int]


@dataclass
class RequestOutput:
    index: int  # position of the prompt in the call
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string) or "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StreamEvent:
    index: int
    token_id: int
    text_delta: str
    finish_reason: str | None


@dataclass
class _Request:
    out: RequestOutput
    params: SamplingParams
    generator: torch.Generator
    seen: list[int]
    stop_ids: set[int]
    max_tokens: int  # params.max_tokens clipped to the context window
    text_sent: int = 0


class LLM:
    def __init__(
        self, model: str | Path | Transformer, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
        max_batch_size: int = 32, tokenizer: Tokenizer | None = None, skip_tokenizer_init: bool = False,
    ):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if isinstance(model, Transformer):
            self.model = model
        else:
            self.model = load_model(model, dtype=dtype, device=device, seed=0)
        self.model.eval()
        self.config = self.model.config
        self.device = next(self.model.parameters()).device
        self.max_batch_size = max_batch_size
        self.tokenizer = tokenizer
        if tokenizer is None and not skip_tokenizer_init:
            if isinstance(model, (str, Path)) and Path(model).is_dir():
                self.tokenizer = Tokenizer.from_folder(model, self.config)
            elif str(model) in PRESETS:
                self.tokenizer = Tokenizer.byte_level(self.config)  # random weights: any byte tokenizer will do
        self._stats: dict[str, float] = {}
        self._cache: LatentCache | None = None

    # ---------------------------------------------------------------------------------- public API
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        requests = self._requests(prompts, params or SamplingParams())
        for _ in self._run(requests):
            pass
        return [r.out for r in requests]

    def stream(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Yield each token as it is produced (all requests interleaved; `index` says whose)."""
        yield from self._run(self._requests(prompts, params or SamplingParams()))

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self._tokenizer().apply_chat_template(messages)], params)[0]

    def stats(self) -> dict[str, float]:
        """Figures of the last call: tokens, seconds, tokens/s, latent-cache bytes (per token, peak, allocated)."""
        return dict(self._stats)

    # ------------------------------------------------------------------------------------- requests
    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this LLM has no tokenizer (skip_tokenizer_init=True): pass prompts as token ids")
        return self.tokenizer

    def _requests(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams) -> list[_Request]:
        """Validate everything before any work starts."""
        if isinstance(params, dict):
            params = SamplingParams(**params)
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        context = self.config.max_position_embeddings
        eos = self.config.eos_token_id
        eos_ids = set() if params.ignore_eos or eos is None else set(eos if isinstance(eos, list) else [eos])
        requests = []
        for i, prompt in enumerate(prompts):
            ids = self._tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise ValueError(f"prompts[{i}]: empty prompt")
            if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in ids):
                raise ValueError(f"prompts[{i}]: token ids must be integers in [0, {self.config.vocab_size})")
            if len(ids) >= context:
                raise SamplingError(
                    f"prompts[{i}]: {len(ids)} tokens leave no room in the context of {context} "
                    "(max_position_embeddings)"
                )
            stop_ids = set(params.stop_token_ids) | eos_ids
            out = RequestOutput(i, ids, text="" if self.tokenizer else None)
            requests.append(_Request(out, params, params.generator(self.device), list(ids), stop_ids,
                                     min(params.max_tokens, context - len(ids))))
        return requests

    # ---------------------------------------------------------------------------------------- loop
    @torch.inference_mode()
    def _run(self, requests: list[_Request]) -> Iterator[StreamEvent]:
        waiting = list(requests)
        slots = min(self.max_batch_size, len(requests))
        max_len = max(len(r.seen) + r.max_tokens for r in requests)
        cache = LatentCache(self.config, slots, max_len, dtype=self.model.embed.weight.dtype, device=self.device)
        active: list[_Request] = []
        t0 = time.perf_counter()
        timing = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_tokens": 0, "decode_tokens": 0}
        peak_bytes = 0
        while waiting or active:
            if waiting and len(active) < slots:
                admitted = waiting[: slots - len(active)]
                del waiting[: len(admitted)]
                t = time.perf_counter()
                logits = self._prefill(cache, len(active), admitted)
                self._sync()
                timing["prefill_s"] += time.perf_counter() - t
                timing["prefill_tokens"] += sum(len(r.seen) for r in admitted)
                active += admitted
                yield from self._emit(admitted, logits)
            else:
                t = time.perf_counter()
                view = cache.rows(0, len(active))
                last = torch.tensor([[r.seen[-1]] for r in active], device=self.device)
                logits = self.model(last, cache=view)[:, -1]
                view.advance(1)
                self._sync()
                timing["decode_s"] += time.perf_counter() - t
                timing["decode_tokens"] += len(active)
                yield from self._emit(active, logits)
            cached_tokens = sum(len(r.seen) - 1 for r in active)  # the newest token is not cached yet
            peak_bytes = max(peak_bytes, cached_tokens * cache.bytes_per_token())
            for i in reversed(range(len(active))):  # retire, keeping active slots contiguous
                if active[i].out.finished:
                    last_slot = len(active) - 1
                    if i != last_slot:
                        cache.move(last_slot, i)
                    active[i] = active[last_slot]
                    active.pop()
        self._stats = {
            **timing,
            "total_s": time.perf_counter() - t0,
            "prefill_tok_per_s": timing["prefill_tokens"] / max(timing["prefill_s"], 1e-9),
            "decode_tok_per_s": timing["decode_tokens"] / max(timing["decode_s"], 1e-9),
            "kv_cache_bytes_per_token": cache.bytes_per_token(),
            "kv_cache_peak_bytes_in_use": peak_bytes,
            "kv_cache_bytes_allocated": cache.bytes_allocated(),
        }

    def _sync(self) -> None:
        """Wait for the device, so the clocks measure work done rather than work queued."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prefill(self, cache: LatentCache, first_slot: int, admitted: list[_Request]) -> torch.Tensor:
        """Prefill the admitted prompts together into slots [first_slot, …): right-padded, each row's
        latents written at its own positions, logits taken at each row's last prompt token."""
        lengths = [len(r.seen) for r in admitted]
        tokens = torch.zeros(len(admitted), max(lengths), dtype=torch.long, device=self.device)
        for row, r in enumerate(admitted):
            tokens[row, : len(r.seen)] = torch.tensor(r.seen)
        view = cache.rows(first_slot, first_slot + len(admitted))
        view.lengths.zero_()
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model(tokens, cache=view, logits_index=last)
        view.lengths.copy_(last + 1)  # padding positions are overwritten by the tokens that follow
        return logits

    def _emit(self, requests: list[_Request], logits: torch.Tensor) -> Iterator[StreamEvent]:
        """Sample one token per request, update its output, yield the events."""
        plain_greedy = [r.params.greedy and r.params.repetition_penalty == 1.0 for r in requests]
        argmax = logits.argmax(dim=-1).tolist() if any(plain_greedy) else None  # one op for the batch
        for i, (r, row) in enumerate(zip(requests, logits, strict=True)):
            token = argmax[i] if plain_greedy[i] else sample(row, r.params, r.seen, r.generator)
            r.seen.append(token)
            out = r.out
            out.token_ids.append(token)
            delta = ""
            if token in r.stop_ids:
                out.finish_reason = "stop"
            elif len(out.token_ids) >= r.max_tokens:
                out.finish_reason = "length"
            if self.tokenizer is not None:
                out.text = self.tokenizer.decode(out.token_ids)
                for s in r.params.stop or ():
                    cut = out.text.find(s, max(0, r.text_sent - len(s)))
                    if cut >= 0:
                        out.text, out.finish_reason = out.text[:cut], "stop"
                # hold back a trailing partial UTF-8 character until it completes
                ready = len(out.text) if out.finished or not out.text.endswith("\ufffd") else len(out.text) - 1
                delta, r.text_sent = out.text[r.text_sent : ready], max(r.text_sent, ready)
            yield StreamEvent(out.index, token, delta, out.finish_reason)
