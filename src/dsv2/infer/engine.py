"""The inference engine: continuous batching over a paged latent cache, and the vLLM-like `LLM` on top.

    llm = LLM("path/to/model", dtype="bfloat16")
    outputs = llm.generate(["Hello", [100000, 1, 2]], SamplingParams(max_tokens=32, temperature=0))
    for event in llm.stream(["Hello"], SamplingParams(max_tokens=32)): print(event.text_delta, end="")

`LLMEngine` is the loop a server drives: `add_request` (validated before anything is queued), `step`
(one scheduler plan: one batched decode forward for every sequence in decode, then one packed forward
of the planned prefill chunks, then sampling), `abort`. Requests join the running batch at the next step
and leave it the step they finish, giving their cache blocks back. The cache holds only latents (`PagedLatentCache`);
decode goes through the absorbed MLA path, on the layouts `Transformer.prepare_for_inference` made.

It is also all a server needs to know of the engine: the rules a request must meet (`check_context`,
`default_max_tokens`, the cache capacity inside `make_request`) and its figures (`stats`) live here.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv2.config import PRESETS
from dsv2.hardware import resolve_dtype
from dsv2.infer.cache import PagedLatentCache
from dsv2.infer.compiled import CompiledDecode, CompiledPrefill
from dsv2.infer.kv_quant import check_kv_cache_dtype
from dsv2.infer.sampling import SamplingError, SamplingParams, sample
from dsv2.infer.scheduler import Scheduler
from dsv2.infer.scheduler import Sequence as CacheSequence
from dsv2.model import Transformer, quant
from dsv2.tokenizer import Tokenizer
from dsv2.weights import load_model

Prompt = str | Sequence[int]
DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class RequestOutput:
    index: int  # position of the prompt in the call (LLM) or 0 (engine)
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string), "length" or "abort"
    request_id: str = ""
    # with SamplingParams.logprobs: log p(token) of each generated token under the model's own distribution
    # (log-softmax of its logits, before penalties, temperature and filters), and the top-n {id: log p}
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    # with SamplingParams.prompt_logprobs: the same for the prompt, given the tokens before each (the first
    # token has none: None), from the prefill's logits
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    # with make_request(record_routing=True), once finished: [T, L, K] the experts every token fed to the model
    # (prompt and generated, T = len(prompt) + len(generated) - 1) was routed to in each of the L MoE layers
    routing: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StreamEvent:
    index: int
    token_id: int
    text_delta: str
    finish_reason: str | None
    request_id: str = ""


@dataclass(eq=False)
class Request:
    """A validated request: what `LLMEngine.add_request` queues."""

    seq: CacheSequence
    out: RequestOutput
    params: SamplingParams
    generator: torch.Generator
    stop_ids: set[int]
    text_sent: int = 0  # characters of out.text streamed so far
    routing: dict[int, torch.Tensor] | None = None  # position -> [L, K] experts (recomputed positions overwrite)

    @property
    def request_id(self) -> str:
        return self.seq.request_id


@dataclass(frozen=True)
class EngineStats:
    """`LLMEngine.stats`: the requests and the cache now, and totals since the engine started."""

    running: int  # admitted requests, prefilling or decoding
    waiting: int  # queued requests, preempted ones included
    blocks_total: int
    blocks_used: int  # held by a running request (the rest are free, or evictable prefix-cache blocks)
    blocks_cached: int  # holding a shareable prefix (held or evictable)
    cached_tokens: int  # latent entries in the cache
    step_blocks_used: int  # blocks used and tokens cached at the end of the last step's forwards, before
    step_cached_tokens: int  # its finished requests gave their blocks back: what peaks are taken over
    cache_bytes_per_token: int
    cache_bytes_allocated: int
    totals: dict[str, float]  # prefill_tokens, decode_tokens, prefill_s, decode_s, preemptions, steps,
    # prefix_queried_tokens (prompt tokens of admitted requests), prefix_hit_tokens (of those, found cached)


class ContextLengthError(SamplingError):
    """A prompt, or a prompt plus max_tokens, that does not fit the model's context. `param` says which
    parameter to change: "prompt" or "max_tokens"."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def releasable(text: str, stop: Sequence[str]) -> int:
    """How much of an unfinished request's decoded `text` can be streamed now: all but a trailing partial
    UTF-8 character (U+FFFD until its last byte arrives) and the longest suffix that is the start of a
    stop string. That suffix is sent once the text grows past it, or cut away with what follows if it
    grows into the stop string; so no stop string ever starts in text already sent."""
    stable = text[:-1] if text.endswith("\ufffd") else text
    held = max((k for s in stop for k in range(1, min(len(s), len(stable) + 1)) if stable.endswith(s[:k])), default=0)
    return len(stable) - held


class LLMEngine:
    """Model + tokenizer + paged latent cache + scheduler.

    cache_bytes: memory for the latent cache (default 1 GiB, at most what `max_running` full-context
    sequences can use); or give `num_blocks` directly. kv_cache_dtype: how the cache stores latents, "auto"
    (the model dtype), "fp8" or "6bit" (`infer/kv_quant.py`); the budget buys blocks at the layout's real
    bytes, so a quantized cache holds more tokens. `prefill_chunk` / `max_prefill_tokens`: see
    `infer/scheduler.py`. prefix_caching: requests start from the cached blocks of a prompt prefix others
    computed (`infer/block_pool.py`). compile_decode: decode steps run as one compiled graph
    (`infer/compiled.py`; CPU only; tens of seconds to compile, on the first decode step of one row and of a
    batch; recompiled after the model is prepared again). compile_prefill: so do prefill steps whose chunks
    are all one length of two tokens or more (one prompt's, or equal prompts'), `CompiledPrefill.MAX_TOKENS` in
    all at most, without prompt logprobs: short prompts, where operators cost more than GEMMs; other prefills run
    eagerly, packed. The model is prepared for inference here; whoever
    changes its weights afterwards must call `model.prepare_for_inference()` again.
    """

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer | None = None, *, max_running: int = 32,
        cache_bytes: int | None = None, num_blocks: int | None = None, block_size: int = 16,
        prefill_chunk: int = 256, max_prefill_tokens: int = 1024, kv_cache_dtype: str = "auto",
        prefix_caching: bool = True, compile_decode: bool = False, compile_prefill: bool = False,
    ):
        check_kv_cache_dtype(kv_cache_dtype)
        self.model = model.eval()
        model.prepare_for_inference()
        self.config = model.config
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        dtype = model.embed.weight.dtype
        if num_blocks is None:
            needed = max_running * -(-self.config.max_position_embeddings // block_size)
            budget = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
            affordable = PagedLatentCache.blocks_for(self.config, budget, block_size, dtype, kv_cache_dtype)
            num_blocks = min(needed, affordable)
            if num_blocks < 1:
                raise ValueError(f"cache_bytes={cache_bytes} does not hold one block of {block_size} tokens")
        self.cache = PagedLatentCache(self.config, num_blocks, block_size, dtype=dtype, device=self.device,
                                      kv_cache_dtype=kv_cache_dtype)
        self.scheduler = Scheduler(num_blocks, block_size, max_running, prefill_chunk, max_prefill_tokens,
                                   prefix_caching=prefix_caching)
        self.requests: dict[str, Request] = {}
        self._weights = model.inference_version  # the weights the cached prefixes were computed with
        self._ids = itertools.count()
        self._totals = {"prefill_tokens": 0, "decode_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0,
                        "preemptions": 0, "steps": 0}
        self._step_usage = (0, 0)  # (blocks used, tokens cached) before the last step's finished requests left
        self.compiled_decode = CompiledDecode(model) if compile_decode else None
        self.compiled_prefill = CompiledPrefill(model) if compile_prefill else None

    # ---------------------------------------------------------------------------------------- requests
    def make_request(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None, index: int = 0,
        what: str = "prompt", record_routing: bool = False,
    ) -> Request:
        """Tokenise and validate; raises (naming `what`) before anything is queued. Thread-safe.
        `record_routing`: keep the experts every token was routed to (`RequestOutput.routing`), for RL's
        routing replay."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            ids = self._tokenizer().encode(prompt)
        elif isinstance(prompt, Sequence):
            ids = list(prompt)
        else:
            raise ValueError(f"{what}: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"{what}: empty prompt")
        vocab = self.config.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise ValueError(f"{what}: token ids must be integers in [0, {vocab})")
        self.check_context(len(ids), params.max_tokens, what)
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise SamplingError(f"sampling parameter `logit_bias`: token ids must be in [0, {vocab})")
        eos = self.config.eos_token_id
        eos_ids = set() if params.ignore_eos or eos is None else set(eos if isinstance(eos, list) else [eos])
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        # a request that needs every prompt position's logits, or every token's routing, computes them all
        seq = CacheSequence(request_id, list(ids), len(ids), params.max_tokens,
                            reuse_prefix=params.prompt_logprobs is None and not record_routing)
        self.scheduler.check_fits(seq, what)
        out = RequestOutput(index, ids, text="" if self.tokenizer else None, request_id=request_id)
        if params.logprobs is not None:
            out.logprobs, out.top_logprobs = [], []
        if params.prompt_logprobs is not None:
            out.prompt_logprobs, out.prompt_top_logprobs = [None], [None]
        return Request(seq, out, params, params.generator(self.device), set(params.stop_token_ids) | eos_ids,
                       routing={} if record_routing else None)

    def check_context(self, prompt_len: int, max_tokens: int, what: str = "prompt") -> None:
        """The context-length rule: the prompt and its max_tokens new tokens must fit the model's context.
        Raises `ContextLengthError` naming `what` and the parameter to change. Thread-safe."""
        context = self.config.max_position_embeddings
        if prompt_len >= context:
            raise ContextLengthError(f"{what}: {prompt_len} tokens leave no room in this model's context of "
                                     f"{context} tokens (max_position_embeddings)", param="prompt")
        if prompt_len + max_tokens > context:
            raise ContextLengthError(f"{what}: this model's context is {context} tokens (max_position_embeddings); "
                                     f"the prompt has {prompt_len} and max_tokens asks for {max_tokens} more",
                                     param="max_tokens")

    def default_max_tokens(self, prompt_len: int) -> int:
        """max_tokens for a request that gives none: as many as the context and the whole cache leave
        (the last token is never cached, hence + 1); at least 1, so that a prompt with no room left is
        refused by `check_context` or the capacity check, naming the prompt. Thread-safe."""
        room = min(self.config.max_position_embeddings, self.scheduler.capacity_tokens() + 1) - prompt_len
        return max(1, room)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        self.scheduler.add(request.seq)
        self.requests[request.request_id] = request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request: its cache blocks are free at once. Unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request.seq)
        request.out.finish_reason = request.out.finish_reason or "abort"
        return request.out

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as token ids")
        return self.tokenizer

    # -------------------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self) -> list[StreamEvent]:
        """Run one scheduler plan; the events of the tokens it produced (finished requests have left)."""
        if self.model.inference_version != self._weights:  # prepared again on new weights
            self.scheduler.forget_prefixes()
            self._weights = self.model.inference_version
            if self.compiled_decode is not None:  # the old weights are frozen into its graph
                self.compiled_decode = CompiledDecode(self.model)
            if self.compiled_prefill is not None:
                self.compiled_prefill = CompiledPrefill(self.model)
        plan = self.scheduler.schedule()
        self._totals["preemptions"] += len(plan.preempted)
        sampled: list[tuple[str, list[Request], torch.Tensor, float]] = []  # (counter, requests, logits, seconds)
        if plan.decode:
            t = time.perf_counter()
            seqs = plan.decode
            last = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
            requests = [self.requests[s.request_id] for s in seqs]
            tables, lengths = [s.blocks for s in seqs], [s.num_computed for s in seqs]
            if self.compiled_decode is not None and all(r.routing is None for r in requests):
                logits = self.compiled_decode(last, self.cache.view(tables, lengths, CompiledDecode.MIN_TABLE_WIDTH))
            else:
                logits = self._forward(requests, last, self.cache.view(tables, lengths), lengths)[:, -1]
            for s in seqs:
                self.scheduler.computed(s, 1)
            sampled.append(("decode", requests, logits, time.perf_counter() - t))
            self._totals["decode_tokens"] += len(seqs)
        if plan.prefill:  # every planned chunk in one packed forward (`Transformer.forward(segments=...)`)
            t = time.perf_counter()
            seqs, counts = [seq for seq, _ in plan.prefill], [n for _, n in plan.prefill]
            starts = [seq.num_computed for seq in seqs]
            requests = [self.requests[seq.request_id] for seq in seqs]
            compiled = (self.compiled_prefill is not None and CompiledPrefill.takes(counts)
                        and not any(r.routing is not None or self._wants_prompt_logprobs(r) for r in requests))
            view = self.cache.view([seq.blocks for seq in seqs], starts,
                                   CompiledPrefill.MIN_TABLE_WIDTH if compiled else 1)
            tokens = torch.tensor([[tok for seq, start, n in zip(seqs, starts, counts, strict=True)
                                    for tok in seq.tokens[start : start + n]]], device=self.device)
            ends = list(itertools.accumulate(counts))
            last = torch.tensor(ends, device=self.device) - 1
            if compiled:  # equal chunks, as the batch of rows they are
                logits = self.compiled_prefill(tokens.view(len(seqs), counts[0]), view)
            elif any(self._wants_prompt_logprobs(r) for r in requests):  # every position's logits, not the last
                every = self._forward(requests, tokens, view, starts, segments=counts)[0]  # [N,vocab]
                for r, start, n, end in zip(requests, starts, counts, ends, strict=True):
                    if self._wants_prompt_logprobs(r):
                        self._record_prompt_logprobs(r, start, every[end - n : end])
                logits = every[last]
            else:
                logits = self._forward(requests, tokens, view, starts, last, counts)
            done = []  # rows whose prompt is now all cached: their last token's logits give the next token
            for row, (seq, n) in enumerate(plan.prefill):
                self.scheduler.computed(seq, n)
                if seq.num_computed == len(seq.tokens):
                    done.append(row)
            self._totals["prefill_tokens"] += sum(counts)
            if done:
                sampled.append(("prefill", [requests[row] for row in done], logits[done], time.perf_counter() - t))
            else:
                self._totals["prefill_s"] += time.perf_counter() - t
        self._step_usage = (self.cache.num_blocks - self.scheduler.allocator.num_free, self._cached_tokens())
        events: list[StreamEvent] = []
        for phase, requests, logits, seconds in sampled:
            t = time.perf_counter()
            events += self._emit(requests, logits)  # sampling reads the logits: the device work is done
            self._totals[f"{phase}_s"] += seconds + time.perf_counter() - t
        self._totals["steps"] += 1
        return events

    def _forward(self, requests: list[Request], tokens: torch.Tensor, view, starts: list[int],
                 logits_index: torch.Tensor | None = None, segments: list[int] | None = None) -> torch.Tensor:
        """The model on one batch of rows, or on rows packed end to end (`segments`); the routing of the
        rows that record it is kept by position."""
        if all(r.routing is None for r in requests):
            return self.model(tokens, cache=view, logits_index=logits_index, segments=segments)
        logits, routings = self.model(tokens, cache=view, logits_index=logits_index, return_routing=True,
                                      segments=segments)
        B, S = tokens.shape
        chosen = (torch.stack([r.indices for r in routings], dim=2).cpu() if routings  # [B,S,L,K]
                  else torch.empty(B, S, 0, 0, dtype=torch.long))  # a dense model routes nothing
        rows = chosen if segments is None else chosen[0].split(segments)
        for r, start, row in zip(requests, starts, rows, strict=True):
            if r.routing is not None:
                r.routing.update({start + i: experts for i, experts in enumerate(row)})
        return logits

    @staticmethod
    def _wants_prompt_logprobs(request: Request) -> bool:
        """Whether the prompt has positions whose logprobs are not recorded yet
        (a sequence recomputed after preemption has them already)."""
        out = request.out
        return out.prompt_logprobs is not None and len(out.prompt_logprobs) < len(out.prompt_token_ids)

    @staticmethod
    def _record_prompt_logprobs(request: Request, start: int, logits: torch.Tensor) -> None:
        """logits [n, vocab] of positions start..start+n-1: row j predicts token start+j+1."""
        out, n_top = request.out, request.params.prompt_logprobs
        prompt = out.prompt_token_ids
        end = min(start + len(logits), len(prompt) - 1)  # the last prompt position predicts a generated token
        if len(out.prompt_logprobs) != start + 1 or end <= start:
            return
        targets = torch.tensor(prompt[start + 1 : end + 1], device=logits.device)
        chosen, top = _logprobs(logits[: end - start], targets, n_top)
        out.prompt_logprobs += chosen
        out.prompt_top_logprobs += top

    def _emit(self, requests: list[Request], logits: torch.Tensor) -> list[StreamEvent]:
        """Sample one token per request, update its output, retire finished ones, return the events."""
        plain_greedy = [r.params.plain_greedy for r in requests]
        # one op for the batch, in fp32 (exact from bf16, same first-maximum ties): torch's bf16 argmax is 4x slower
        # (V2-Lite's 102400 logits: 372 us against 90 plus the cast, 2-core Zen 4)
        argmax = logits.float().argmax(dim=-1).tolist() if any(plain_greedy) else None
        events = []
        for i, (r, row) in enumerate(zip(requests, logits, strict=True)):
            seq, out = r.seq, r.out
            token = argmax[i] if plain_greedy[i] else sample(row, r.params, seq.tokens, seq.prompt_len, r.generator)
            seq.tokens.append(token)
            out.token_ids.append(token)
            if r.params.logprobs is not None:
                chosen, top = _logprobs(row[None], torch.tensor([token], device=row.device), r.params.logprobs)
                out.logprobs += chosen
                out.top_logprobs += top
            if token in r.stop_ids:
                out.finish_reason = "stop"
            elif seq.num_generated >= seq.max_tokens:
                out.finish_reason = "length"
            delta = ""
            if self.tokenizer is not None:
                text, stop = self.tokenizer.decode(out.token_ids), r.params.stop or ()
                # what could start a stop string is never sent (`releasable`), so a match starts in the rest
                cuts = [at for s in stop if (at := text.find(s, r.text_sent)) >= 0]
                if cuts:
                    text, out.finish_reason = text[: min(cuts)], "stop"
                ready = len(text) if out.finished else releasable(text, stop)
                out.text, delta, r.text_sent = text, text[r.text_sent : ready], max(r.text_sent, ready)
            if out.finished:
                if r.routing is not None:
                    out.routing = torch.stack([r.routing[p] for p in range(len(seq.tokens) - 1)])
                self.scheduler.finish(seq)
                del self.requests[seq.request_id]
            events.append(StreamEvent(out.index, token, delta, out.finish_reason, seq.request_id))
        return events

    # ------------------------------------------------------------------------------------------- stats
    def stats(self) -> EngineStats:
        """Requests, cache use and totals. Thread-safe: it only reads counts, so a server may call it
        while the engine thread steps."""
        step_blocks, step_tokens = self._step_usage
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            blocks_total=self.cache.num_blocks, blocks_used=self.cache.num_blocks - self.scheduler.allocator.num_free,
            blocks_cached=self.scheduler.allocator.num_cached,
            cached_tokens=self._cached_tokens(), step_blocks_used=step_blocks, step_cached_tokens=step_tokens,
            cache_bytes_per_token=self.cache.bytes_per_token(), cache_bytes_allocated=self.cache.bytes_allocated(),
            totals={**self._totals, "prefix_queried_tokens": self.scheduler.allocator.queried_tokens,
                    "prefix_hit_tokens": self.scheduler.allocator.hit_tokens},
        )

    def _cached_tokens(self) -> int:
        return sum(s.num_computed for s in list(self.scheduler.running))  # waiting sequences have none cached


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, n_top: int) -> tuple[list[float], list[dict[int, float]]]:
    """Rows of raw logits [n, vocab] and the token each was followed by [n] -> log p of those tokens under
    the model's own distribution (log-softmax, before any penalty or filter) and each row's top-`n_top`
    {id: log p} (empty for 0)."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
    if not n_top:
        return chosen, [{} for _ in chosen]
    top = logprobs.topk(n_top, dim=-1)
    return chosen, [dict(zip(i, v, strict=True)) for i, v in zip(top.indices.tolist(), top.values.tolist(),
                                                                  strict=True)]


class LLM:
    """Offline batched generation: every prompt of a call becomes a request of one `LLMEngine`.

    quantization: the weights' format, "int8" / "int4" (weight-only, quantized at load unless the checkpoint
    is stored so), "w8a8" / "w4a8" (those weights with int8 activations), "fp8" (a block-FP8 checkpoint kept in
    FP8) or "bf16" (an fp32 model's weights stored in bf16, products in fp32); None: `dtype` as loaded.
    dtype: "auto" (bf16 on a GPU or a CPU with native bf16, else fp32: `dsv2.hardware`), "bfloat16", "float32" or a
    torch.dtype; a model passed as a module keeps its own. kv_cache_dtype: how the latent cache stores tokens
    ("auto", "fp8", "6bit"). prefix_caching: share the cache blocks of common prompt prefixes; prefill_chunk /
    max_prefill_tokens: the prefill a step may do while others decode / while nobody does; compile_decode /
    compile_prefill: decode steps / prefill steps of equal chunks as compiled graphs (CPU; `LLMEngine`)."""

    def __init__(
        self, model: str | Path | Transformer, dtype: str | torch.dtype = "auto", device: str = "cpu",
        max_batch_size: int = 32, tokenizer: Tokenizer | None = None, skip_tokenizer_init: bool = False,
        cache_bytes: int | None = None, block_size: int = 16, kv_cache_dtype: str = "auto",
        quantization: str | None = None, prefix_caching: bool = True, prefill_chunk: int = 256,
        max_prefill_tokens: int = 1024, compile_decode: bool = False, compile_prefill: bool = False,
    ):
        check_kv_cache_dtype(kv_cache_dtype)  # both before a checkpoint loads
        quant.check_quantization(quantization)
        dtype = resolve_dtype(dtype, device)
        net = model if isinstance(model, Transformer) else load_model(
            model, dtype=dtype, device=device, seed=0, fp8="keep" if quantization == "fp8" else "dequantize")
        net = quant.for_inference(net, quantization)
        if tokenizer is None and not skip_tokenizer_init:
            if isinstance(model, (str, Path)) and Path(model).is_dir():
                tokenizer = Tokenizer.from_folder(model, net.config)
            elif str(model) in PRESETS:
                tokenizer = Tokenizer.byte_level(net.config)  # random weights: any byte tokenizer will do
        self.engine = LLMEngine(net, tokenizer, max_running=max_batch_size, cache_bytes=cache_bytes,
                                block_size=block_size, kv_cache_dtype=kv_cache_dtype, prefix_caching=prefix_caching,
                                prefill_chunk=prefill_chunk, max_prefill_tokens=max_prefill_tokens,
                                compile_decode=compile_decode, compile_prefill=compile_prefill)
        self.model, self.config, self.tokenizer = net, net.config, tokenizer
        self._stats: dict[str, float | str] = {}

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        requests = self._requests(prompts, params or SamplingParams())
        for _ in self._run(requests):
            pass
        return [r.out for r in requests]

    def stream(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Yield each token as it is produced (all requests interleaved; `index` says whose)."""
        yield from self._run(self._requests(prompts, params or SamplingParams()))

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.engine._tokenizer().apply_chat_template(messages)], params)[0]

    def stats(self) -> dict[str, float | str]:
        """Figures of the last call: tokens, seconds, tokens/s, latent-cache bytes (per token, peak, allocated),
        the dtype the model computes in (what `dtype="auto"` chose) and whether decode steps ran compiled."""
        return dict(self._stats)

    def _requests(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams) -> list[Request]:
        """Validate every prompt before any work starts."""
        if isinstance(params, dict):
            params = SamplingParams(**params)
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        return [self.engine.make_request(p, params, index=i, what=f"prompts[{i}]") for i, p in enumerate(prompts)]

    def _run(self, requests: list[Request]) -> Iterator[StreamEvent]:
        engine = self.engine
        before = engine.stats().totals
        t0 = time.perf_counter()
        peak_tokens = peak_blocks = 0
        for r in requests:
            engine.add_request(r)
        try:
            while any(not r.out.finished for r in requests):
                events = engine.step()
                now = engine.stats()
                peak_tokens = max(peak_tokens, now.step_cached_tokens)
                peak_blocks = max(peak_blocks, now.step_blocks_used)
                yield from events
        finally:  # a consumer that stops early (or an error) must not leave requests holding blocks
            for r in requests:
                engine.abort(r.request_id)
        after = engine.stats()
        done = {k: after.totals[k] - before[k] for k in before}
        self._stats = {
            **done,
            "total_s": time.perf_counter() - t0,
            "prefill_tok_per_s": done["prefill_tokens"] / max(done["prefill_s"], 1e-9),
            "decode_tok_per_s": done["decode_tokens"] / max(done["decode_s"], 1e-9),
            "kv_cache_bytes_per_token": after.cache_bytes_per_token,
            "kv_cache_peak_bytes_in_use": peak_tokens * after.cache_bytes_per_token,
            "kv_cache_peak_blocks": peak_blocks,
            "kv_cache_bytes_allocated": after.cache_bytes_allocated,
            "dtype": str(self.model.embed.weight.dtype).removeprefix("torch."),
            "decode": "eager" if engine.compiled_decode is None else "compiled",
            "prefill": "eager" if engine.compiled_prefill is None else "compiled",
        }
