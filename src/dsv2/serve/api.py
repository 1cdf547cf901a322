"""The OpenAI-compatible HTTP API (FastAPI). It talks only to the engine, through `AsyncEngine`.

    GET  /health                 liveness
    GET  /metrics                Prometheus text: requests running / waiting, cache blocks, prefix-cache
                                 hits, tokens/s
    GET  /v1/models              the one model served
    POST /v1/completions         prompt(s) -> text; `stream: true` for server-sent events
    POST /v1/chat/completions    messages -> reply, DeepSeek-V2-Chat template

Every error is answered with OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 for a
malformed or invalid request (naming the parameter), 401 for a missing or wrong API key, 404 for an
unknown model. A request is fully validated (and tokenised) before it reaches the engine, so a bad one
changes nothing there. The rules a request must meet beyond the protocol's (context length, default
max_tokens, cache capacity) are the engine's own (`LLMEngine.check_context`, `default_max_tokens`,
`make_request`); this module only maps their errors to HTTP.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from dsv2.infer.engine import ContextLengthError, LLMEngine, StreamEvent
from dsv2.infer.engine import Request as EngineRequest
from dsv2.infer.sampling import SamplingError, SamplingParams
from dsv2.serve.async_engine import AsyncEngine
from dsv2.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    usage,
)
from dsv2.tokenizer import TokenizerError


def create_app(engine: LLMEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    runner = AsyncEngine(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="dsv2", lifespan=lifespan)
    app.state.runner = runner

    # ------------------------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), api_key.encode()):
                err = APIError(401, "missing or invalid API key (Authorization: Bearer KEY)", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    # ----------------------------------------------------------------------------------- helpers
    async def parse(request: Request, schema: type[SamplingFields]) -> Any:
        """The body as `schema`, whatever Content-Type the client sent (curl -d sends a form type)."""
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
        for name, honoured in schema.UNSUPPORTED.items():
            if name in data and data[name] not in honoured:
                raise APIError(400, f"{name}: dsv2 cannot honour {name}={data[name]!r}; leave it out", param=name)
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}", param=param) from None

    def check_model(body: SamplingFields) -> None:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def sampling(body: SamplingFields, max_tokens: int, choice: int, logprobs: int | None,
                 prompt_logprobs: int | None) -> SamplingParams:
        seed = None if body.seed is None else body.seed + choice  # n > 1 with a seed: distinct, reproducible
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                min_p=body.min_p, repetition_penalty=body.repetition_penalty, stop=body.stop, seed=seed,
                ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, logit_bias=body.logit_bias, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        except SamplingError as e:
            raise APIError(400, str(e), param=named(e)) from None

    def named(e: SamplingError | ValueError) -> str | None:
        """The parameter a `SamplingError` names (its message quotes it: sampling parameter `top_p`: ...)."""
        return str(e).split("`")[1] if isinstance(e, SamplingError) and "`" in str(e) else None

    def requests_for(prompts: list[str | list[int]], body: SamplingFields, max_tokens: int | None, kind: str,
                     logprobs: int | None = None, prompt_logprobs: int | None = None,
                     ) -> tuple[list[EngineRequest], list[int]]:
        """n requests per prompt, choice index = prompt · n + j (OpenAI's order); prompt lengths.
        max_tokens None: the engine's default for each prompt."""
        base = new_id(kind)
        param = "prompt" if kind == "cmpl" else "messages"
        out, lengths = [], []
        for p, prompt in enumerate(prompts):
            if isinstance(prompt, str) and engine.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")
            ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            lengths.append(len(ids))
            for j in range(body.n):
                index = p * body.n + j
                params = sampling(body, engine.default_max_tokens(len(ids)) if max_tokens is None else max_tokens, j,
                                  logprobs, prompt_logprobs)
                try:
                    out.append(engine.make_request(ids, params, request_id=f"{base}-{index}", index=index,
                                                   what=f"{param}[{p}]" if len(prompts) > 1 else param))
                except ContextLengthError as e:
                    raise APIError(400, str(e), param=param if e.param == "prompt" else e.param,
                                   code="context_length_exceeded") from None
                except (SamplingError, ValueError) as e:
                    raise APIError(400, str(e), param=named(e) or param) from None
        return out, lengths

    def sse(payload: dict[str, Any] | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    # ---------------------------------------------------------------------------------- endpoints
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        lines = []
        for name, value in runner.snapshot().items():
            kind = "counter" if name.endswith("_total") and name != "cache_blocks_total" else "gauge"
            lines += [f"# TYPE dsv2_{name} {kind}", f"dsv2_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "dsv2"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await parse(request, CompletionRequest)
        check_model(body)
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of: dsv2 returns every sample it draws; give best_of = n or leave it out",
                           param="best_of")
        prompt = body.prompt
        one = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], int))  # text or token ids
        prompts = [prompt] if one else list(prompt)
        if not prompts:
            raise APIError(400, "prompt: expected at least one prompt", param="prompt")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 generates nothing; it is for scoring a prompt, with echo: true",
                           param="max_tokens")
        # max_tokens 0 (scoring a prompt: echo + logprobs) runs one step and drops the token it samples
        requests, lengths = requests_for(prompts, body, max(max_tokens, 1), "cmpl",
                                         logprobs=body.logprobs, prompt_logprobs=body.logprobs if body.echo else None)
        rid, created = requests[0].request_id.rsplit("-", 1)[0], now()
        prompt_text = {r.out.index: prompt_of(prompts[r.out.index // body.n]) for r in requests}

        def generated(r: EngineRequest, ids: list[int]) -> list[int]:
            return ids if max_tokens > 0 else []

        def logprobs(r: EngineRequest, first: int, last: int, with_prompt: bool) -> dict[str, Any] | None:
            """Generated tokens first..last-1 (and the prompt's before them), in the legacy format."""
            if body.logprobs is None:
                return None
            out = r.out
            ids, lps, tops = out.token_ids[first:last], out.logprobs[first:last], out.top_logprobs[first:last]
            if with_prompt:
                ids, lps = out.prompt_token_ids + ids, out.prompt_logprobs + lps
                tops = out.prompt_top_logprobs + tops
            offset = 0 if body.echo else len(prompt_text[out.index]) + len(token_texts(out.token_ids[:first]))
            texts = [token_text(t) for t in ids]
            top = [None if alts is None else by_text([*alts.items(), (ids[i], lps[i])]) for i, alts in enumerate(tops)]
            return completion_logprobs(texts, lps, top, offset)

        def chunk(r: EngineRequest, k: int, ev: StreamEvent) -> dict[str, Any]:
            text, lp = ev.text_delta if max_tokens > 0 else "", None
            if max_tokens > 0 or (body.echo and k == 0):
                lp = logprobs(r, k, k + 1 if max_tokens > 0 else k, with_prompt=body.echo and k == 0)
            if body.echo and k == 0:
                text = prompt_text[r.out.index] + text
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": ev.index, "text": text, "logprobs": lp, "finish_reason":
                                 None if ev.finish_reason is None else finish_reason(r)}]}

        def finish_reason(r: EngineRequest) -> str:
            return r.out.finish_reason if max_tokens > 0 else "length"

        if body.stream:
            return stream_response(requests, lengths, body, "text_completion", chunk, lambda: [], generated)
        await finish_all(requests)
        choices = []
        for r in requests:
            n_gen = len(generated(r, r.out.token_ids))
            text = (r.out.text or "") if max_tokens > 0 else ""
            choices.append({"index": r.out.index, "text": (prompt_text[r.out.index] if body.echo else "") + text,
                            "logprobs": logprobs(r, 0, n_gen, with_prompt=body.echo),
                            "finish_reason": finish_reason(r)})
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices,
                "usage": usage(sum(lengths), sum(len(generated(r, r.out.token_ids)) for r in requests))}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        check_model(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template", param="messages")
        try:
            ids = engine.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
        except TokenizerError as e:
            raise APIError(400, str(e), param="messages") from None
        requests, lengths = requests_for([ids], body, body.max_completion_tokens or body.max_tokens, "chatcmpl",
                                         logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        rid, created = requests[0].request_id.rsplit("-", 1)[0], now()

        def logprobs(r: EngineRequest, first: int, last: int) -> dict[str, Any] | None:
            if not body.logprobs:
                return None
            out = r.out
            tops = [sorted(((token_text(a), v) for a, v in alts.items()), key=lambda x: -x[1])
                    for alts in out.top_logprobs[first:last]]
            return chat_logprobs(token_texts(out.token_ids[first:last], each=True), out.logprobs[first:last], tops)

        def chunk(r: EngineRequest, k: int, ev: StreamEvent) -> dict[str, Any]:
            text, finish = ev.text_delta, ev.finish_reason
            delta = {"content": text} if text or finish is None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": ev.index, "delta": delta, "logprobs": logprobs(r, k, k + 1),
                                 "finish_reason": finish}]}

        def role_chunks() -> list[dict[str, Any]]:  # OpenAI opens each choice with the role
            return [{"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                     "choices": [{"index": r.out.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]} for r in requests]

        if body.stream:
            return stream_response(requests, lengths, body, "chat.completion.chunk", chunk, role_chunks,
                                   lambda r, ids: ids)
        await finish_all(requests)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": r.out.index, "message": {"role": "assistant", "content": r.out.text or ""},
                             "logprobs": logprobs(r, 0, len(r.out.token_ids)), "finish_reason": r.out.finish_reason}
                            for r in requests],
                "usage": usage(sum(lengths), sum(len(r.out.token_ids) for r in requests))}

    def token_text(token_id: int) -> str:
        return engine.tokenizer.token_text(token_id) if engine.tokenizer is not None else f"token_id:{token_id}"

    def by_text(alternatives: list[tuple[int, float]]) -> dict[str, float]:
        """{text: log p}; tokens with the same text (pieces of UTF-8 characters all read U+FFFD) keep the
        highest, so the best alternative is never hidden."""
        out: dict[str, float] = {}
        for token_id, logprob in alternatives:
            text = token_text(token_id)
            out[text] = max(logprob, out.get(text, logprob))
        return out

    def token_texts(ids: list[int], each: bool = False) -> list[str] | str:
        """Each token's own text (`each`) or their concatenation."""
        texts = [token_text(t) for t in ids]
        return texts if each else "".join(texts)

    def prompt_of(prompt: str | list[int]) -> str:
        """The prompt as text, for echo: as sent, or its tokens decoded."""
        if isinstance(prompt, str):
            return prompt
        return engine.tokenizer.decode(prompt) if engine.tokenizer is not None else ""

    async def finish_all(requests: list[EngineRequest]) -> None:
        async for _ in runner.stream(requests):
            pass

    def stream_response(requests, lengths, body: SamplingFields, obj: str, chunk, opening,
                        generated) -> StreamingResponse:
        """One chunk per event, even one that adds no text yet: `chunk(request, k, event)` renders the k-th
        event of a request; `generated(request, ids)` says which of its tokens the usage counts."""
        by_id = {r.request_id: r for r in requests}

        async def events() -> AsyncIterator[str]:
            for first in opening():
                yield sse(first)
            seen = dict.fromkeys(by_id, 0)
            async for ev in runner.stream(requests):
                yield sse(chunk(by_id[ev.request_id], seen[ev.request_id], ev))
                seen[ev.request_id] += 1
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse({"id": requests[0].request_id.rsplit("-", 1)[0], "object": obj, "created": now(),
                           "model": model_name, "choices": [],
                           "usage": usage(sum(lengths), sum(len(generated(r, r.out.token_ids)) for r in requests))})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
