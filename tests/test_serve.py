"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client and raw HTTP:
chat, completions, streaming, n > 1, stop strings, batch invariance, cancellation freeing every cache
block, and the bad-input battery (each case its status code and message, and the server keeps serving)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from conftest import require

from dsv2 import LLM, SamplingParams
from dsv2.infer.engine import LLMEngine

openai = require("openai")
uvicorn = require("uvicorn")
from dsv2.serve.api import create_app  # noqa: E402

KEY = "sk-test"


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    return LLM("nano", dtype="float32")


@pytest.fixture(scope="module")
def server(llm):
    """A live server over its own engine (same weights and tokenizer as `llm`), on a free port."""
    engine = LLMEngine(llm.model, llm.tokenizer, num_blocks=256, block_size=8, prefill_chunk=32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, "nano", api_key=KEY), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def greedy(llm, prompt, n=12):
    return llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0))[0]


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics").text
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if not line.startswith("#"))}


# ------------------------------------------------------------------------------------ openai client
def test_models_and_completion(client, llm):
    assert [m.id for m in client.models.list().data] == ["nano"]
    r = client.completions.create(model="nano", prompt="def main():", max_tokens=12, temperature=0)
    expected = greedy(llm, "def main():")
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.token_ids)


def test_chat_and_streaming_agree(client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = llm.tokenizer.apply_chat_template(messages)
    expected = greedy(llm, ids, 10)
    r = client.chat.completions.create(model="nano", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="nano", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    streamed = client.completions.create(model="nano", prompt="abc", max_tokens=9, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == greedy(llm, "abc", 9).text


def test_n_choices_with_seed(client):
    kwargs = dict(model="nano", prompt="x = ", max_tokens=8, temperature=1.0, seed=7, n=3)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed reproduces every choice
    assert len({c.text for c in a.choices}) > 1  # and the choices are not copies of one another
    assert a.usage.completion_tokens == 3 * 8 and a.usage.prompt_tokens == 5  # BOS + "x = ", counted once


def test_stop_string(client, llm):
    full = greedy(llm, "hello", 20)
    needle = full.text[3:5]
    r = client.completions.create(model="nano", prompt="hello", max_tokens=20, temperature=0, stop=[needle])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full.text[: full.text.find(needle)]


def test_streamed_stop_strings_equal_the_completion(client, llm):
    """The SSE deltas add up to the non-streamed text: what might start a stop string is held back."""
    for prompt in ["hello", "import os"]:  # '\ufffdBBBBBB', 'j==j=j=j=j=j=j=+j=+' with these weights
        text = greedy(llm, prompt, 20).text
        stops = [text[i : i + 2] for i in (1, 4)] + [text[5] + "\x07"]  # two that match, one that only starts to
        stops = [s for s in stops if "\ufffd" not in s]
        for stop in [*([s] for s in stops), stops]:
            kwargs = dict(model="nano", prompt=prompt, max_tokens=20, temperature=0, stop=stop)
            whole = client.completions.create(**kwargs).choices[0]
            streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
            assert streamed == whole.text, (prompt, stop)
            cuts = [text.find(s) for s in stop if s in text]
            assert whole.text == (text[: min(cuts)] if cuts else text), (prompt, stop)
            assert whole.finish_reason == "stop" or not cuts


def test_concurrent_greedy_equals_sequential(client, llm):
    prompts = ["import os", "class A:", "for i in range(10):", "# comment", "x"]
    sequential = [greedy(llm, p, 16).text for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(client.completions.create, model="nano", prompt=p, max_tokens=16, temperature=0)
                   for p in prompts]
        concurrent_texts = [f.result().choices[0].text for f in futures]
    assert concurrent_texts == sequential


# ---------------------------------------------------------------------------------- log-probabilities
@torch.no_grad()
def full_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is log p(· | ids[: i + 1]) from one plain forward."""
    return llm.model(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1)


@pytest.mark.parametrize("max_tokens", [0, 1])  # 0: pure scoring; 1: what lm-eval's local-completions sends
def test_echo_logprobs_score_the_prompt_like_a_full_forward(client, llm, max_tokens):
    prompts = [llm.tokenizer.encode("The cat sat on the mat."), [0, 5, 9, 200, 31, 7]]
    r = client.completions.create(model="nano", prompt=prompts, max_tokens=max_tokens, temperature=0, echo=True,
                                  logprobs=3)
    assert r.usage.completion_tokens == max_tokens * 2
    for prompt, choice in zip(prompts, sorted(r.choices, key=lambda c: c.index), strict=True):
        lp = choice.logprobs
        ids = prompt + greedy(llm, prompt, max_tokens).token_ids if max_tokens else prompt
        assert len(lp.tokens) == len(ids) and lp.tokens == [llm.tokenizer.token_text(t) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
        expected = full_logprobs(llm, ids)
        want = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-4)
        for i, top in enumerate(lp.top_logprobs[1:]):
            best = expected[i].topk(3)
            assert {llm.tokenizer.token_text(t) for t in best.indices.tolist()} | {lp.tokens[i + 1]} == set(top)
            assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
        assert choice.text == llm.tokenizer.decode(prompt) + (greedy(llm, prompt, 1).text if max_tokens else "")
        assert choice.finish_reason == ("length" if max_tokens == 0 else greedy(llm, prompt, 1).finish_reason)


def test_generated_logprobs_streamed_and_not_agree(client, llm):
    kwargs = dict(model="nano", prompt="import os", max_tokens=8, temperature=0, logprobs=2)
    whole = client.completions.create(**kwargs).choices[0]
    out = greedy(llm, "import os", 8)
    expected = full_logprobs(llm, out.prompt_token_ids + out.token_ids)[len(out.prompt_token_ids) - 1 :]
    want = expected.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(whole.logprobs.token_logprobs), want, atol=1e-4)
    assert whole.logprobs.text_offset[0] == len("import os")  # offsets continue the prompt's text
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kwargs, stream=True)]
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    assert sum((s.tokens for s in streamed), []) == whole.logprobs.tokens
    assert sum((s.text_offset for s in streamed), []) == whole.logprobs.text_offset


def test_chat_logprobs(client, llm):
    messages = [{"role": "user", "content": "Hello"}]
    ids = llm.tokenizer.apply_chat_template(messages)
    out = greedy(llm, ids, 6)
    r = client.chat.completions.create(model="nano", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [llm.tokenizer.token_text(t) for t in out.token_ids]
    expected = full_logprobs(llm, ids + out.token_ids)[len(ids) - 1 :]
    for c, row, t in zip(content, expected, out.token_ids, strict=True):
        assert c.logprob == pytest.approx(row[t].item(), abs=1e-4) and c.bytes == list(c.token.encode())
        assert [a.logprob for a in c.top_logprobs] == pytest.approx(row.topk(4).values.tolist(), abs=1e-4)
    stream = client.chat.completions.create(model="nano", messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, stream=True)
    chunks = [c for c in stream if c.choices and c.choices[0].logprobs]
    streamed = [c.choices[0].logprobs.content[0].logprob for c in chunks]  # its prompt's prefix came from the cache
    assert streamed == pytest.approx([c.logprob for c in content], abs=1e-5)
    plain = client.chat.completions.create(model="nano", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


# --------------------------------------------------------------------------------- penalties, refusals
def test_penalties_and_logit_bias_are_honoured(client, llm):
    """The server's penalised greedy output is the engine's; a +100 bias forces a token, -100 bans one."""
    for kwargs in [dict(presence_penalty=1.5), dict(frequency_penalty=2.0), dict(presence_penalty=-1.0)]:
        r = client.completions.create(model="nano", prompt="abc", max_tokens=12, temperature=0, **kwargs)
        want = llm.generate("abc", SamplingParams(max_tokens=12, temperature=0, **kwargs))[0]
        assert r.choices[0].text == want.text, kwargs
    plain, penalised = greedy(llm, "abc", 12).token_ids, llm.generate(
        "abc", SamplingParams(max_tokens=12, temperature=0, frequency_penalty=2.0))[0].token_ids
    assert plain != penalised  # the penalty changed something: the comparison above is not vacuous
    forced = llm.tokenizer.encode("z", add_bos=False)[0]
    r = client.completions.create(model="nano", prompt=[0, 5], max_tokens=4, temperature=1.0, seed=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == "zzzz"
    banned = plain[0]
    r = client.completions.create(model="nano", prompt="abc", max_tokens=1, temperature=0,
                                  logit_bias={str(banned): -100}, logprobs=0)
    assert r.choices[0].logprobs.tokens[0] != llm.tokenizer.token_text(banned)


# ------------------------------------------------------------------------------- cancellation, burst
def test_burst_with_disconnects_frees_every_block(server):
    base, _ = server
    body = {"model": "nano", "max_tokens": 400, "temperature": 0.8, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}

    def one(i: int) -> int:
        with httpx.Client(timeout=60) as http, http.stream(
            "POST", base + "/v1/completions", json={**body, "prompt": f"request {i}"}, headers=headers,
        ) as r:
            assert r.status_code == 200
            lines = 0
            for line in r.iter_lines():
                lines += line.startswith("data: ")
                if i % 2 and lines == 3:
                    return lines  # hang up mid-stream
        return lines

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(one, range(8)))
    assert all(c == 3 for c in counts[1::2]) and all(c > 3 for c in counts[::2])
    deadline = time.time() + 20
    while (m := metrics(base))["dsv2_cache_blocks_used"] != 0:
        assert time.time() < deadline, m
        time.sleep(0.05)
    assert m["dsv2_cache_blocks_used"] == 0 and m["dsv2_requests_running"] == 0 and m["dsv2_aborted_total"] >= 4


# ----------------------------------------------------------------------------------------- bad input
def post(base: str, path: str, content: str | bytes, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + path, content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(("path", "body", "key", "status", "param", "message"), [
    ("/v1/completions", '{"model": "nano", "prompt": "x"', KEY, 400, None, "not valid JSON"),
    ("/v1/completions", "[1, 2]", KEY, 400, None, "must be a JSON object"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "max_tokens": "many"}', KEY, 400, "max_tokens", "integer"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "max_tokens": 0}', KEY, 400, "max_tokens", "with echo"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "max_tokens": -1}', KEY, 400, "max_tokens", "greater"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "max_tokens": 4000}', KEY, 400, "max_tokens", "context"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "temperature": -1}', KEY, 400, "temperature", "greater"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "top_p": 0}', KEY, 400, "top_p", "greater"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "n": 0}', KEY, 400, "n", "greater"),
    ("/v1/completions", '{"model": "nano", "prompt": [1, 5000]}', KEY, 400, "prompt", "token ids"),
    ("/v1/completions", '{"model": "nano", "prompt": []}', KEY, 400, "prompt", "at least one"),
    ("/v1/completions", '{"prompt": "x"}', KEY, 400, "model", "required"),
    ("/v1/completions", '{"model": "gpt-9", "prompt": "x"}', KEY, 404, "model", "does not exist"),
    ("/v1/completions", '{"model": "nano", "prompt": "' + "a" * 3000 + '"}', KEY, 400, "prompt", "context"),
    ("/v1/chat/completions", '{"model": "nano", "messages": []}', KEY, 400, "messages", "at least 1"),
    ("/v1/chat/completions", '{"model": "nano", "messages": [{"role": "bot", "content": "x"}]}', KEY, 400,
     "messages.0.role", "'system', 'user' or 'assistant'"),
    ("/v1/chat/completions", '{"model": "nano", "messages": [{"role": "user"}]}', KEY, 400,
     "messages.0.content", "required"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', KEY, 400, "stop",
     "at most 4"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "logprobs": 6}', KEY, 400, "logprobs", "less than"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "suffix": "end"}', KEY, 400, "suffix", "cannot honour"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "best_of": 3}', KEY, 400, "best_of", "best_of = n"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "presence_penalty": 2.5}', KEY, 400, "presence_penalty",
     "less than"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "logit_bias": {"5000": 1}}', KEY, 400, "logit_bias",
     "token ids"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "logit_bias": {"5": 300}}', KEY, 400, "logit_bias",
     "[-100, 100]"),
    ("/v1/completions", '{"model": "nano", "prompt": "x", "logit_bias": {"five": 1}}', KEY, 400,
     "logit_bias.five.[key]", "integer"),
    ("/v1/chat/completions", '{"model": "nano", "messages": [{"role": "user", "content": "x"}], "tools": '
     '[{"type": "function", "function": {"name": "f"}}]}', KEY, 400, "tools", "cannot honour"),
    ("/v1/chat/completions", '{"model": "nano", "messages": [{"role": "user", "content": "x"}], "response_format": '
     '{"type": "json_object"}}', KEY, 400, "response_format", "cannot honour"),
    ("/v1/chat/completions", '{"model": "nano", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
     KEY, 400, "top_logprobs", "logprobs: true"),
    ("/v1/chat/completions", '{"model": "nano", "messages": [{"role": "user", "content": "x"}], "logprobs": true, '
     '"top_logprobs": 21}', KEY, 400, "top_logprobs", "less than"),
    ("/v1/completions", '{"model": "nano", "prompt": "x"}', None, 401, None, "API key"),
    ("/v1/completions", '{"model": "nano", "prompt": "x"}', "sk-wrong", 401, None, "API key"),
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, path, body, key, status, param, message):
    base, engine = server
    r = post(base, path, body, key)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"]
    assert engine.stats().blocks_used == 0 and engine.stats().running == 0  # nothing reached the engine
    ok = post(base, "/v1/completions", json.dumps({"model": "nano", "prompt": "ok", "max_tokens": 2}))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_n_samples_and_later_requests_share_the_prompt_prefix(server, client, llm):
    """One request's n samples wait for the first to compute the shared blocks, then reuse them; a later
    request with the same system prompt reuses them too; the outputs are those of an engine without it."""
    base, engine = server
    # first: an engine prepares the model again, which makes the server's engine drop its cached prefixes
    plain = LLMEngine(llm.model, llm.tokenizer, num_blocks=256, block_size=8, prefill_chunk=32, prefix_caching=False)
    system = "You are a terse assistant. " * 4  # 108 tokens with BOS: 13 full blocks of 8
    before = metrics(base)
    r = client.completions.create(model="nano", prompt=system + "Q1", max_tokens=6, temperature=0.7, seed=1, n=4)
    after = metrics(base)
    prompt_len = len(llm.tokenizer.encode(system + "Q1"))
    blocks = (prompt_len - 1) // 8
    assert after["dsv2_prefix_cache_hit_tokens_total"] - before["dsv2_prefix_cache_hit_tokens_total"] == 3 * 8 * blocks
    for choice in r.choices:
        params = SamplingParams(max_tokens=6, temperature=0.7, seed=1 + choice.index)
        request = plain.make_request(system + "Q1", params)
        plain.add_request(request)
        while plain.has_unfinished():
            plain.step()
        assert choice.text == request.out.text
    again = client.completions.create(model="nano", prompt=system + "Q2", max_tokens=6, temperature=0)
    assert again.choices[0].text == greedy(llm, system + "Q2", 6).text
    final = metrics(base)
    assert final["dsv2_prefix_cache_hit_tokens_total"] - after["dsv2_prefix_cache_hit_tokens_total"] >= 8 * 12
    assert final["dsv2_cache_blocks_used"] == 0 and final["dsv2_cache_blocks_cached"] >= blocks


def test_health_and_metrics_need_no_key(server):
    base, _ = server
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    m = metrics(base)
    names = {"requests_running", "requests_waiting", "cache_blocks_used", "cache_blocks_total", "tokens_per_second",
             "cache_blocks_cached", "cache_bytes_per_token", "prefix_cache_hit_tokens_total",
             "prefix_cache_queried_tokens_total", "process_cpu_seconds_total"}
    assert {f"dsv2_{name}" for name in names} <= m.keys()
