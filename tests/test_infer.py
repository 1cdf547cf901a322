"""Inference: absorbed vs naive MLA, cached vs uncached decoding, prepared vs unprepared model, the engine
vs the plain loop and transformers' generate, batching, seeds, stop strings while streaming, sampling
filters and input validation."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, PROMPTS, drain, random_model, randomize_, require

import dsv2
from dsv2 import LLM, SamplingError, SamplingParams
from dsv2.infer.cache import LatentCache, PagedLatentCache
from dsv2.infer.engine import LLMEngine, releasable
from dsv2.infer.generate import generate
from dsv2.infer.sampling import apply_openai_penalties, filter_logits, sample
from dsv2.model.mla import MLA
from dsv2.model.moe import MoE
from dsv2.tokenizer import Tokenizer


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n_queries", [1, 7])
@torch.no_grad()
def test_absorbed_equals_naive_attention(case, n_queries):
    model = random_model(case)
    cfg = model.config
    attn = model.layers[0].attn
    B, T = 3, 90
    cache = torch.randn(B, 128, cfg.kv_cache_dim)
    x = torch.randn(B, n_queries, cfg.hidden_size)
    positions = torch.tensor([[T - n_queries + i for i in range(n_queries)]] * B) - torch.tensor([[0], [5], [30]])
    cos, sin = model.rope(positions)
    mask = torch.arange(T) <= positions.unsqueeze(-1)
    q_nope, q_pe = attn.queries(x, cos, sin)
    c_kv, k_pe = attn.latents(x, cos, sin)
    cache[torch.arange(B)[:, None], positions] = torch.cat([c_kv, k_pe], -1)
    history = cache[:, :T]
    absorbed = attn.absorbed(q_nope, q_pe, history, mask)
    naive = attn.naive(q_nope, q_pe, *history.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1), mask)
    assert rel_err(absorbed, naive) <= 1e-5


def test_path_choice_follows_cost():
    cfg = dsv2.preset("deepseek-v2")
    with torch.device("meta"):
        attn = MLA(cfg)
    assert attn.absorbed_is_cheaper(1, 1) and attn.absorbed_is_cheaper(1, 4096)  # decode
    assert attn.absorbed_is_cheaper(64, 4096)  # a short chunk over a long prefix
    assert not attn.absorbed_is_cheaper(512, 4096)  # long chunks decompress once instead
    assert not any(attn.absorbed_is_cheaper(s, s) for s in (2, 64, 512))  # a fresh prefill never absorbs
    # where absorbed's fp32 work weighs 3x naive's bf16 (a CPU computing in bf16), only much shorter chunks absorb
    assert not attn.absorbed_is_cheaper(64, 4096, cpu_bf16=True)
    assert attn.absorbed_is_cheaper(16, 4096, cpu_bf16=True) and attn.absorbed_is_cheaper(1, 2, cpu_bf16=True)


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_cached_decoding_equals_full_forward(case):
    model = random_model(case)
    x = torch.randint(0, model.config.vocab_size, (2, 120))
    full = model(x)
    cache = LatentCache(model.config, 2, 160)
    chunks = [model(x[:, :70], cache=cache)]  # a long prefill chunk (naive path) ...
    cache.advance(70)
    for start, stop in [(70, 73), *((t, t + 1) for t in range(73, 120))]:  # ... a short one, then decode
        chunks.append(model(x[:, start:stop], cache=cache))
        cache.advance(stop - start)
    assert rel_err(torch.cat(chunks, 1), full) <= 1e-5
    assert cache.bytes_in_use() == 2 * 120 * model.config.num_hidden_layers * model.config.kv_cache_dim * 4


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("parts", [[(0, 0, 70), (1, 40, 43), (2, 100, 101)], [(0, 0, 24), (1, 40, 64), (2, 70, 94)]],
                         ids=["unequal", "equal"])  # (row, first position, end)
@torch.no_grad()
def test_packed_forward_equals_rows_one_at_a_time(case, paged, parts):
    """Several rows' chunks packed end to end into one forward (`segments`) = each row's own forward, each
    written into its own row of the cache, which decoding then reads. Unequal parts: a 70-token chunk from
    position 0 (naive path), a 3-token chunk after 40 cached tokens and a single token after 100 (absorbed
    path). Equal parts, which run as a batch of rows: 24 tokens each from positions 0, 40 and 70 (a mask)."""
    model = random_model(case)
    x = torch.randint(0, model.config.vocab_size, (3, 102))
    full = model(x)
    packed = torch.cat([x[row, start:stop] for row, start, stop in parts])[None]
    segments = [stop - start for _, start, stop in parts]

    def prefilled_cache():
        if paged:
            pool = PagedLatentCache(model.config, num_blocks=64, block_size=8)
            cache = pool.view([list(range(0, 16)), list(range(16, 32)), list(range(32, 48))], [0, 0, 0])
        else:
            cache = LatentCache(model.config, 3, 128)
        for row, start, _ in parts:  # rows after a prefix hold it already, cached alone
            if start:
                model(x[row : row + 1, :start], cache=cache.row(row))
                cache.row(row).lengths += start
        return cache

    cache = prefilled_cache()
    logits = model(packed, cache=cache, segments=segments)
    assert rel_err(logits, torch.cat([full[row, start:stop] for row, start, stop in parts])[None]) <= 1e-5
    cache.lengths += torch.tensor(segments)
    nxt = torch.tensor([stop for _, _, stop in parts])  # then one decode step of all three rows reads the cache
    assert rel_err(model(x[torch.arange(3), nxt][:, None], cache=cache)[:, 0], full[torch.arange(3), nxt]) <= 1e-5
    last = torch.tensor(segments).cumsum(0) - 1
    ends = model(packed, cache=prefilled_cache(), segments=segments, logits_index=last)
    assert rel_err(ends, full[torch.arange(3), nxt - 1]) <= 1e-5


def cached_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of x [B,S] through a latent cache: a 70-token prefill chunk (naive path), then a 3-token
    chunk and single-token decode steps (absorbed path)."""
    cache = LatentCache(model.config, x.shape[0], x.shape[1], dtype=model.embed.weight.dtype)
    chunks = []
    for start, stop in [(0, 70), (70, 73), *((t, t + 1) for t in range(73, x.shape[1]))]:
        chunks.append(model(x[:, start:stop], cache=cache))
        cache.advance(stop - start)
    return torch.cat(chunks, 1)


@pytest.mark.parametrize(("case", "dtype"), [*((c, torch.float32) for c in sorted(CASES)),
                                             ("v2_like", torch.bfloat16)])
@torch.no_grad()
def test_prepared_model_equals_unprepared_and_keeps_no_state(case, dtype):
    model = random_model(case, dtype)
    x = torch.randint(0, model.config.vocab_size, (2, 80))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    unprepared = cached_logits(model, x)
    model.prepare_for_inference()
    model.prepare_for_inference()  # twice is harmless: it replaces the copies
    assert torch.equal(cached_logits(model, x), unprepared)  # the same layouts, made once instead of per call
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in after.items())
    assert not list(model.buffers())
    attn, gate = model.layers[0].attn, model.layers[-1].ffn.gate
    assert attn.absorbed_weights() is attn.prepared_absorbed and gate.prepared_weight.dtype == torch.float32
    owned = {id(p) for p in model.parameters()}
    assert all(id(t) not in owned for t in [*attn.prepared_absorbed, gate.prepared_weight])


def test_prepared_copies_follow_new_weights_only_when_prepared_again():
    torch.manual_seed(0)
    model = random_model("v2_like")
    engine = LLMEngine(model, max_running=4)  # prepares the model
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def engine_tokens() -> list[list[int]]:
        return drain(engine, PROMPTS, params)

    before = engine_tokens()
    randomize_(model)  # new weights, in place: the prepared copies are now stale
    attn = model.layers[0].attn
    assert not torch.equal(attn.prepared_absorbed[0], attn.split_wkv_b()[0])
    model.prepare_for_inference()
    after = engine_tokens()
    assert after != before
    assert after == [generate(model, p, params) for p in PROMPTS]


def test_differentiating_forward_never_uses_prepared_copies():
    """A forward that records gradients (training) computes every layout from the weights themselves:
    stale prepared copies change nothing, and the gradients reach wkv_b and the router."""
    model = random_model("v2_like")
    model.prepare_for_inference()
    # new weights, so the prepared copies are stale (in new storage: an fp32 router's copy is its weight)
    for block in model.layers:
        block.attn.wkv_b.weight.data = 2 * block.attn.wkv_b.weight.data
        if isinstance(block.ffn, MoE):
            block.ffn.gate.weight.data = -block.ffn.gate.weight.data
    cfg, attn = model.config, model.layers[0].attn
    positions = torch.arange(5, 8)[None]  # 3 queries at positions 5..7 over 8 cached latents
    cos, sin = model.rope(positions)
    q_nope, q_pe = attn.queries(torch.randn(1, 3, cfg.hidden_size), cos, sin)
    history, mask = torch.randn(1, 8, cfg.kv_cache_dim), torch.arange(8) <= positions.unsqueeze(-1)
    absorbed = attn.absorbed(q_nope, q_pe, history, mask)
    naive = attn.naive(q_nope, q_pe, *history.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1), mask)
    assert rel_err(absorbed, naive) <= 1e-5
    absorbed.sum().backward()
    assert attn.wkv_b.weight.grad.abs().sum() > 0

    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    fresh = random_model("v2_like")
    fresh.load_state_dict(model.state_dict())  # the same weights, never prepared
    logits = model(tokens)
    assert torch.equal(logits, fresh(tokens))
    logits.sum().backward()
    assert model.layers[-1].ffn.gate.weight.grad.abs().sum() > 0
    with torch.no_grad():  # while inference reads the stale router copies
        assert not torch.equal(model(tokens), fresh(tokens))


def test_rope_forward_rewrites_no_attribute():
    model = random_model("v2_like")
    inv_freq = model.rope.inv_freq
    model.rope(torch.arange(4, device="meta"))  # another device: forward moves a copy, not the attribute
    assert model.rope.inv_freq is inv_freq and inv_freq.dtype == torch.float32


def test_cache_bytes_formula():
    cfg = dsv2.preset("deepseek-v2-lite")
    cache = LatentCache(cfg.replace(num_hidden_layers=2), batch_size=2, max_len=8, dtype=torch.bfloat16)
    cache.lengths[:] = torch.tensor([3, 5])
    assert cache.bytes_per_token() == 2 * (512 + 64) * 2
    assert cache.bytes_in_use() == 8 * 2 * (512 + 64) * 2


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    model = random_model("v2_like")
    return LLM(model, max_batch_size=3, tokenizer=Tokenizer.byte_level(model.config))


def test_engine_greedy_equals_plain_loop_and_transformers(llm, tmp_path):
    transformers = require("transformers")

    params = SamplingParams(max_tokens=12, temperature=0)
    outs = llm.generate(PROMPTS, params)  # 4 mixed-length prompts through 3 slots: admission mid-run too
    dsv2.save_model(llm.model, tmp_path)
    theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == generate(llm.model, prompt, params, eos_id=1)
        ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=1,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
        assert out.finish_reason == ("stop" if out.token_ids[-1] == 1 else "length")


def test_batched_equals_one_by_one(llm):
    params = SamplingParams(max_tokens=10, temperature=0)
    batched = [o.token_ids for o in llm.generate(PROMPTS, params)]
    single = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    assert batched == single


def test_seed_reproduces_sampling_independent_of_batch(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    a = llm.generate(PROMPTS, params)
    b = llm.generate(PROMPTS[::-1], params)[::-1]
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert a[0].token_ids == generate(llm.model, PROMPTS[0], params, eos_id=1)
    other = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99))
    assert [o.token_ids for o in a] != [o.token_ids for o in other]


def test_stream_matches_generate_and_stops(llm):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    events = list(llm.stream(PROMPTS[:2], params))
    outs = llm.generate(PROMPTS[:2], params)
    for i, out in enumerate(outs):
        mine = [e for e in events if e.index == i]
        assert [e.token_id for e in mine] == out.token_ids and mine[-1].finish_reason == "length"
        assert "".join(e.text_delta for e in mine) == out.text
    stop_on = outs[0].token_ids[2]
    stopped = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_on]))[0]
    assert stopped.token_ids == outs[0].token_ids[: outs[0].token_ids.index(stop_on) + 1]
    assert stopped.finish_reason == "stop"


def test_stop_string_cuts_text(nano):
    llm = nano
    full = llm.generate("hello", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(full.text) > 3
    needle = full.text[2:4]
    out = llm.generate("hello", SamplingParams(max_tokens=20, temperature=0, stop=needle, ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.find(needle)]


def test_releasable_holds_back_what_could_start_a_stop_string():
    assert releasable("abcB", ["BB"]) == 3  # "B" may become "BB"
    assert releasable("abcB", ["BB", "cBx"]) == 2  # the longest candidate wins
    assert releasable("abcab", ["abd"]) == 3 and releasable("abc", ["zz"]) == 3
    assert releasable("ab\ufffd", ["x"]) == 2  # a partial UTF-8 character
    assert releasable("aB\ufffd", ["Bé"]) == 1  # the partial character may complete the stop string
    assert releasable("aB", []) == 2 and releasable("", ["x"]) == 0


@pytest.fixture(scope="module")
def nano():
    return LLM("nano", dtype="float32")


def test_streamed_text_equals_final_text_with_stop_strings(nano):
    """Many prompts x stop strings in one batch: the deltas add up to the final text, which is cut at the
    first stop string. Stops are pieces of the unstopped text (every token is one byte, so a stop of two
    or more characters straddles tokens), or such pieces with a character that never follows, which
    match partly and must then be released."""
    params = dict(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = ["hello", "def f(x):", "The quick", "1 2 3", "import os"]
    full = {p: o.text for p, o in zip(prompts, nano.generate(prompts, SamplingParams(**params)), strict=True)}
    cases = []
    for p, text in full.items():
        pieces = {text[i : i + n] for i in range(0, len(text), 3) for n in (1, 2, 3)} - {""}
        pieces = sorted(s for s in pieces if "\ufffd" not in s)
        cases += [(p, [s]) for s in pieces] + [(p, [s + "\x07"]) for s in pieces[:4]] + [(p, pieces[-2:])]
    engine = LLMEngine(nano.model, nano.tokenizer, max_running=len(cases))
    requests = [engine.make_request(p, SamplingParams(**params, stop=stop)) for p, stop in cases]
    streamed = {r.request_id: "" for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        for event in engine.step():
            streamed[event.request_id] += event.text_delta
    assert {r.out.finish_reason for r in requests} == {"stop", "length"}
    for (p, stop), r in zip(cases, requests, strict=True):
        cuts = [full[p].find(s) for s in stop if s in full[p]]
        assert r.out.text == full[p][: min(cuts)] if cuts else full[p], (p, stop)
        assert r.out.finish_reason == ("stop" if cuts else "length")
        assert streamed[r.request_id] == r.out.text, (p, stop)


def test_stats_report_latent_cache_bytes(llm):
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    s = llm.stats()
    per_token = llm.config.num_hidden_layers * llm.config.kv_cache_dim * 4
    assert s["kv_cache_bytes_per_token"] == per_token
    assert s["kv_cache_peak_bytes_in_use"] == (3 + 41 + 2 * 5 - 2) * per_token  # the last token is never cached
    assert s["decode_tokens"] == 2 * 4 and s["prefix_queried_tokens"] == 44
    assert s["prefill_tokens"] + s["prefix_hit_tokens"] == 44  # what earlier tests left cached is not recomputed


# ------------------------------------------------------------------------------------------ sampling
def test_filters_never_emit_outside_their_set():
    torch.manual_seed(0)
    logits = torch.randn(50)
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    top5 = set(order[:5].tolist())
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist())
    above_min = set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    g = torch.Generator().manual_seed(0)
    for params, allowed in [
        (SamplingParams(top_k=5), top5), (SamplingParams(top_p=0.6), nucleus), (SamplingParams(min_p=0.2), above_min),
    ]:
        drawn = {sample(logits, params, [], 0, g) for _ in range(400)}
        assert drawn <= allowed and len(drawn) > 1
    assert torch.isinf(filter_logits(logits, top_k=5)).sum() == 45


def test_repetition_penalty_and_greedy():
    logits = torch.tensor([3.0, 2.9, -1.0])
    g = torch.Generator()
    assert sample(logits, SamplingParams(temperature=0), [], 0, g) == 0
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=2.0), [0], 0, g) == 1


def test_openai_penalties_and_logit_bias_follow_the_definition():
    """logit[j] - c[j]·frequency - (c[j] > 0)·presence + bias[j], c counting generated tokens only."""
    logits = torch.tensor([3.0, 2.9, 2.5, -1.0])
    seen, prompt_len = [2, 2, 0, 0, 0, 1], 2  # the prompt's two 2s are not counted
    got = apply_openai_penalties(logits, seen[prompt_len:], presence=0.5, frequency=0.25, bias={3: 10.0, 2: -1.0})
    assert torch.allclose(got, torch.tensor([3.0 - 3 * 0.25 - 0.5, 2.9 - 0.25 - 0.5, 2.5 - 1.0, -1.0 + 10.0]))
    g = torch.Generator()
    assert sample(logits, SamplingParams(temperature=0, presence_penalty=0.2), [0], 1, g) == 0  # prompt only
    assert sample(logits, SamplingParams(temperature=0, presence_penalty=0.2), [0], 0, g) == 1
    assert sample(logits, SamplingParams(temperature=0, frequency_penalty=0.1), [3, 0], 1, g) == 0  # 3 - 0.1 > 2.9
    assert sample(logits, SamplingParams(temperature=0, frequency_penalty=0.1), [0, 0], 0, g) == 1  # 3 - 0.2
    assert sample(logits, SamplingParams(logit_bias={3: 100}), [], 0, g) == 3  # sampled: bias dominates
    assert not SamplingParams(temperature=0, logit_bias={3: 0.5}).plain_greedy


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_k": -3}, "top_k"), ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"stop": [""]}, "stop"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {5: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"logprobs": True}, "logprobs"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(SamplingError, match=f"`{field}`"):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context_is_refused_before_work(llm):
    too_long = [3] * llm.config.max_position_embeddings
    with pytest.raises(SamplingError, match=r"prompts\[1\]: .*max_position_embeddings"):
        llm.generate([[1, 2], too_long], SamplingParams(max_tokens=4))


def test_model_folder_without_tokenizer(tmp_path):
    dsv2.save_model(dsv2.load_model("nano", seed=0), tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        LLM(tmp_path)
    ids_only = LLM(tmp_path, skip_tokenizer_init=True)
    assert len(ids_only.generate([[0, 5, 6]], SamplingParams(max_tokens=3))[0].token_ids) <= 3
    with pytest.raises(ValueError, match="no tokenizer"):
        ids_only.generate("text prompt")


@torch.no_grad()
def test_engine_records_logprobs_and_routing_of_every_token():
    """What GRPO needs from a rollout: each sampled token's log p under the model, and the experts every token
    fed to the model was routed to. Both must equal a plain full forward of the finished sequence."""
    model = random_model("v2_like")
    engine = LLMEngine(model, max_running=4, prefill_chunk=8, max_prefill_tokens=8)  # chunked prefill too
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=2, ignore_eos=True)
    requests = [engine.make_request(p, params, record_routing=True) for p in PROMPTS[:3]]
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    for r in requests:
        out = r.out
        tokens = torch.tensor([out.prompt_token_ids + out.token_ids[:-1]])
        logits, routings = model(tokens, return_routing=True)
        expected = logits[0, len(out.prompt_token_ids) - 1 :].log_softmax(-1)
        generated = torch.tensor(out.token_ids)
        assert torch.allclose(torch.tensor(out.logprobs), expected.gather(1, generated[:, None])[:, 0], atol=1e-4)
        assert [len(top) for top in out.top_logprobs] == [2] * len(generated)
        assert out.routing.shape == (tokens.shape[1], len(routings), model.config.num_experts_per_tok)
        want = torch.stack([x.indices[0] for x in routings], dim=1)  # [T, L, K]
        assert torch.equal(out.routing.sort(-1).values, want.sort(-1).values)


@torch.no_grad()
@pytest.mark.parametrize("num_blocks", [64, 5])  # 5 blocks of 4 tokens: the three requests preempt one another
def test_prompt_and_sampled_logprobs_equal_a_full_forward(num_blocks):
    """Prompt logprobs come from chunked prefill (recomputed ones after preemption are not recorded twice),
    sampled ones from decode; both are the raw log-softmax even when penalties and a bias pick the tokens."""
    model = random_model("v2_like")
    engine = LLMEngine(model, max_running=3, num_blocks=num_blocks, block_size=4, prefill_chunk=4,
                       max_prefill_tokens=4)
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=1, logprobs=3, prompt_logprobs=2, ignore_eos=True,
                            presence_penalty=1.0, frequency_penalty=0.5, logit_bias={7: 5.0}, repetition_penalty=1.2)
    prompts = [[5, 17, 99, 4, 8, 15, 16, 23, 42], [200], list(range(100, 112))]
    requests = [engine.make_request(p, params) for p in prompts]
    for r in requests:
        engine.add_request(r)
    preempted = 0
    while engine.has_unfinished():
        engine.step()
        preempted = engine.stats().totals["preemptions"]
    assert (preempted > 0) == (num_blocks == 5)
    for r in requests:
        out = r.out
        ids = out.prompt_token_ids + out.token_ids
        expected = model(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1)  # row i predicts ids[i + 1]
        chosen = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        P = len(out.prompt_token_ids)
        assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
        assert len(out.prompt_logprobs) == P and len(out.logprobs) == len(out.token_ids)
        assert torch.allclose(torch.tensor(out.prompt_logprobs[1:] + out.logprobs), chosen, atol=1e-4)
        for i, top in enumerate(out.prompt_top_logprobs[1:] + out.top_logprobs):
            k = 2 if i < P - 1 else 3
            want = expected[i].topk(k)
            assert list(top) == want.indices.tolist()
            assert torch.allclose(torch.tensor(list(top.values())), want.values, atol=1e-4)


def test_replayed_routing_reproduces_the_router_and_overrides_it():
    model = random_model("v2_like")
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    logits, routings = model(tokens, return_routing=True)
    own = torch.stack([r.indices for r in routings], dim=2)  # [B,S,L,K]
    assert torch.allclose(model(tokens, replay=own), logits, atol=1e-6)
    forced = torch.zeros_like(own)  # every token to expert 0 (and its other slots) in every layer
    forced[..., 1:] = torch.arange(1, own.shape[-1])
    replayed, replayed_routings = model(tokens, return_routing=True, replay=forced)
    assert all(torch.equal(r.indices, forced[:, :, i]) for i, r in enumerate(replayed_routings))
    assert not torch.allclose(replayed, logits, atol=1e-4)
    with pytest.raises(ValueError, match="replay"):
        model(tokens, replay=own[:, :5])
