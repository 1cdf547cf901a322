"""The OpenAI-compatible HTTP API (FastAPI). It talks only to the engine, through `AsyncEngine`.

    GET  /health                 liveness
    GET  /metrics                Prometheus text: requests running / waiting, cache blocks, tokens/s
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

from dsv2.infer.engine import ContextLengthError, LLMEngine
from dsv2.infer.engine import Request as EngineRequest
from dsv2.infer.sampling import SamplingError, SamplingParams
from dsv2.serve.async_engine import AsyncEngine
from dsv2.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
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

    def sampling(body: SamplingFields, max_tokens: int, choice: int) -> SamplingParams:
        seed = None if body.seed is None else body.seed + choice  # n > 1 with a seed: distinct, reproducible
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                min_p=body.min_p, repetition_penalty=body.repetition_penalty, stop=body.stop, seed=seed,
                ignore_eos=body.ignore_eos,
            )
        except SamplingError as e:
            raise APIError(400, str(e), param=str(e).split("`")[1] if "`" in str(e) else None) from None

    def requests_for(prompts: list[str | list[int]], body: SamplingFields, max_tokens: int | None,
                     kind: str) -> tuple[list[EngineRequest], list[int]]:
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
                params = sampling(body, engine.default_max_tokens(len(ids)) if max_tokens is None else max_tokens, j)
                try:
                    out.append(engine.make_request(ids, params, request_id=f"{base}-{index}", index=index,
                                                   what=f"{param}[{p}]" if len(prompts) > 1 else param))
                except ContextLengthError as e:
                    raise APIError(400, str(e), param=param if e.param == "prompt" else e.param,
                                   code="context_length_exceeded") from None
                except (SamplingError, ValueError) as e:
                    raise APIError(400, str(e), param=param) from None
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
        prompt = body.prompt
        one = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], int))  # text or token ids
        prompts = [prompt] if one else list(prompt)
        if not prompts:
            raise APIError(400, "prompt: expected at least one prompt", param="prompt")
        requests, lengths = requests_for(prompts, body, body.max_tokens or 16, "cmpl")
        rid, created = requests[0].request_id.rsplit("-", 1)[0], now()

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return stream_response(requests, lengths, body, chunk, lambda: [])
        await finish_all(requests)
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": r.out.index, "text": r.out.text or "", "logprobs": None,
                             "finish_reason": r.out.finish_reason} for r in requests],
                "usage": usage(sum(lengths), sum(len(r.out.token_ids) for r in requests))}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        check_model(body)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template", param="messages")
        try:
            ids = engine.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
        except TokenizerError as e:
            raise APIError(400, str(e), param="messages") from None
        requests, lengths = requests_for([ids], body, body.max_completion_tokens or body.max_tokens, "chatcmpl")
        rid, created = requests[0].request_id.rsplit("-", 1)[0], now()

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if text or finish is None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def role_chunks() -> list[dict[str, Any]]:  # OpenAI opens each choice with the role
            return [{"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                     "choices": [{"index": r.out.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]} for r in requests]

        if body.stream:
            return stream_response(requests, lengths, body, chunk, role_chunks)
        await finish_all(requests)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": r.out.index, "message": {"role": "assistant", "content": r.out.text or ""},
                             "logprobs": None, "finish_reason": r.out.finish_reason} for r in requests],
                "usage": usage(sum(lengths), sum(len(r.out.token_ids) for r in requests))}

    async def finish_all(requests: list[EngineRequest]) -> None:
        async for _ in runner.stream(requests):
            pass

    def stream_response(requests, lengths, body: SamplingFields, chunk, opening) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            for first in opening():
                yield sse(first)
            async for ev in runner.stream(requests):  # one chunk per token, even one that adds no text yet
                yield sse(chunk(ev.index, ev.text_delta, ev.finish_reason))
            if body.stream_options is not None and body.stream_options.include_usage:
                last = chunk(0, "", None)
                last["choices"] = []
                last["usage"] = usage(sum(lengths), sum(len(r.out.token_ids) for r in requests))
                yield sse(last)
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
