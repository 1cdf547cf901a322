"""Continuous batching: the scheduler's policy (pure Python), and the engine over a paged cache giving the
same tokens as the contiguous cache, the plain loop and a lone run, with preemption, chunked prefill and
cancellation, and every cache block free again afterwards."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import PROMPTS, random_model

from dsv2 import SamplingParams
from dsv2.infer.block_pool import ROOT, BlockPool
from dsv2.infer.cache import LatentCache, PagedLatentCache, _PagedLayer
from dsv2.infer.engine import ContextLengthError, LLMEngine
from dsv2.infer.generate import generate
from dsv2.infer.scheduler import Scheduler, Sequence


def seq(name: str, n_prompt: int, max_tokens: int = 4) -> Sequence:
    return Sequence(name, list(range(n_prompt)), n_prompt, max_tokens)


def run_plan(sched: Scheduler) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """Schedule one step and pretend the model ran it: decode and completed prefills append a token."""
    plan = sched.schedule()
    for s in plan.decode:
        sched.computed(s, 1)
        s.tokens.append(7)
    for s, n in plan.prefill:
        sched.computed(s, n)
        if s.num_computed == len(s.tokens):
            s.tokens.append(7)
    return ([s.request_id for s in plan.decode], [(s.request_id, n) for s, n in plan.prefill],
            [s.request_id for s in plan.preempted])


# ---------------------------------------------------------------------------------------- scheduler
def test_long_prompt_is_chunked_while_others_decode():
    sched = Scheduler(num_blocks=64, block_size=4, prefill_chunk=8, max_prefill_tokens=8)
    sched.add(seq("short", 3))
    assert run_plan(sched) == ([], [("short", 3)], [])
    sched.add(seq("long", 20))
    for chunk in (8, 8, 4):  # 20 tokens in chunks of 8, one per step, while "short" decodes each step
        assert run_plan(sched) == (["short"], [("long", chunk)], [])
    assert run_plan(sched)[0] == ["short", "long"]


def test_prefill_budget_is_one_chunk_while_anyone_decodes():
    """A step that decodes does at most `prefill_chunk` tokens of prefill (the tail of the inter-token latency);
    with nobody decoding the whole `max_prefill_tokens` budget runs."""
    sched = Scheduler(num_blocks=64, block_size=4, prefill_chunk=8, max_prefill_tokens=24)
    for name in "abc":
        sched.add(seq(name, 8))
    assert run_plan(sched) == ([], [("a", 8), ("b", 8), ("c", 8)], [])
    for name, n in (("d", 5), ("e", 3), ("f", 2)):
        sched.add(seq(name, n))
    assert run_plan(sched) == (["a", "b", "c"], [("d", 5), ("e", 3)], [])  # 8 tokens; f waits its turn
    assert run_plan(sched) == (["a", "b", "c", "d", "e"], [("f", 2)], [])


def test_chunks_are_cut_at_fixed_offsets_of_each_sequence():
    sched = Scheduler(num_blocks=64, block_size=4, prefill_chunk=8, max_prefill_tokens=12)
    sched.add(seq("a", 19))
    sched.add(seq("b", 5))
    # a's chunks are 8, 8, 3 whatever shares the step; b's 5 waits for a step with room for all of it
    assert [run_plan(sched)[1] for _ in range(3)] == [[("a", 8)], [("a", 8)], [("a", 3), ("b", 5)]]


def test_preemption_recomputes_newest_and_keeps_progress():
    sched = Scheduler(num_blocks=4, block_size=4, prefill_chunk=16, max_prefill_tokens=16)
    sched.add(seq("old", 7, max_tokens=8))
    sched.add(seq("new", 7, max_tokens=8))
    assert run_plan(sched) == ([], [("old", 7), ("new", 7)], [])  # 2 + 2 blocks: the pool is full
    assert run_plan(sched) == (["old", "new"], [], [])  # positions 7 and 8 fit in the second blocks
    decode, prefill, preempted = run_plan(sched)  # position 8 of both needs a third block each
    assert preempted == ["new"] and decode == ["old"] and prefill == []
    new = sched.waiting[0]
    assert new.num_computed == 0 and new.blocks == [] and new.num_generated == 2  # generated tokens kept
    assert sched.allocator.num_free == 1


def test_two_prefills_on_a_full_pool_do_not_wait_for_each_other():
    """Both admitted with blocks for their first chunk only; the pool then has too few for either's next
    chunk: the older takes the newer's blocks (it is preempted) instead of both waiting forever."""
    sched = Scheduler(num_blocks=5, block_size=4, prefill_chunk=8, max_prefill_tokens=16)
    sched.add(seq("old", 16))
    sched.add(seq("new", 16))
    assert run_plan(sched) == ([], [("old", 8), ("new", 8)], [])  # 2 + 2 blocks, 1 free
    assert run_plan(sched) == ([], [("old", 8)], ["new"])
    assert sched.waiting[0].request_id == "new" and sched.waiting[0].num_computed == 0


def test_refuses_what_can_never_fit_and_frees_on_abort():
    sched = Scheduler(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="need 3 cache blocks; the cache has 2"):
        sched.add(seq("big", 6, max_tokens=4))
    sched.add(seq("a", 5, max_tokens=2))
    run_plan(sched)
    assert sched.allocator.num_free == 0
    assert sched.abort("a") is not None and sched.allocator.num_free == 2 and not sched.has_work()
    assert sched.abort("a") is None


def test_admission_is_first_come_first_served():
    sched = Scheduler(num_blocks=3, block_size=4, max_running=8)
    sched.add(seq("a", 9))  # 3 blocks
    sched.add(seq("b", 1))
    assert run_plan(sched)[1] == [("a", 9)]
    assert run_plan(sched)[1] == []  # b waits for blocks even though it is small... and a is in decode
    sched.finish(sched.running[0])
    assert run_plan(sched)[1] == [("b", 1)]


# --------------------------------------------------------------------------------------- paged cache
@pytest.mark.parametrize("case", ["v2_like", "lite_like"])
@torch.no_grad()
def test_paged_cache_equals_contiguous(case):
    model = random_model(case)
    x = torch.randint(0, model.config.vocab_size, (2, 45))
    contiguous = LatentCache(model.config, 2, 48)
    paged = PagedLatentCache(model.config, num_blocks=32, block_size=4)
    blocks = list(range(32))
    random.Random(0).shuffle(blocks)
    tables = [blocks[:12], blocks[12:24]]  # each row's 48 positions on scattered, disjoint blocks
    outs = {"contiguous": [], "paged": []}
    for start, stop in [(0, 30), (30, 33), *((t, t + 1) for t in range(33, 45))]:
        outs["contiguous"].append(model(x[:, start:stop], cache=contiguous))
        contiguous.advance(stop - start)
        view = paged.view([t[: -(-stop // 4)] for t in tables], [start, start])
        outs["paged"].append(model(x[:, start:stop], cache=view))
    full = model(x)
    for name, chunks in outs.items():
        assert ((torch.cat(chunks, 1) - full).abs().max() / full.abs().max()).item() <= 1e-5, name


# -------------------------------------------------------------------------------------------- engine
def drain(engine: LLMEngine, requests) -> None:
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_model("v2_like")


def test_engine_under_pressure_matches_plain_loop_and_frees_every_block(model):
    """Few blocks (preemption), small chunks (chunked prefill), mixed lengths: same greedy tokens."""
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [*PROMPTS, list(range(3, 60))]
    engine = LLMEngine(model, num_blocks=12, block_size=8, prefill_chunk=16, max_prefill_tokens=24)
    requests = [engine.make_request(p, params) for p in prompts]
    drain(engine, requests)
    assert engine.stats().totals["preemptions"] > 0
    for prompt, r in zip(prompts, requests, strict=True):
        assert r.out.token_ids == generate(model, prompt, params)
    assert engine.stats().blocks_used == 0 and engine.stats().blocks_total == 12


def test_greedy_alone_equals_among_others(model):
    params = SamplingParams(max_tokens=8, temperature=0)
    target = list(range(40, 95))
    alone = LLMEngine(model, prefill_chunk=16)
    mine = alone.make_request(target, params)
    drain(alone, [mine])
    busy = LLMEngine(model, prefill_chunk=16, max_prefill_tokens=20)
    others = [busy.make_request(p, SamplingParams(max_tokens=12, temperature=0.8, seed=i))
              for i, p in enumerate(PROMPTS)]
    for r in others[:2]:
        busy.add_request(r)
    busy.step()  # the target joins a batch that is already decoding
    again = busy.make_request(target, params)
    drain(busy, [again, *others[2:]])
    assert again.out.token_ids == mine.out.token_ids


def test_abort_frees_blocks_at_once(model):
    engine = LLMEngine(model, num_blocks=20, block_size=4)
    reqs = [engine.make_request(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), request_id=f"r{i}")
            for i, p in enumerate(PROMPTS)]
    for r in reqs:
        engine.add_request(r)
    for _ in range(3):
        engine.step()
    assert engine.stats().blocks_used > 0
    for r in reqs[:2]:
        assert engine.abort(r.request_id).finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().blocks_used == 0
    assert all(len(r.out.token_ids) == 30 for r in reqs[2:])
    with pytest.raises(ValueError, match="more than the whole cache"):
        engine.make_request(list(range(70)), SamplingParams(max_tokens=20))


# ------------------------------------------------------------------------- the engine's rules and figures
def test_context_rule_refuses_naming_the_parameter(model):
    engine = LLMEngine(model, num_blocks=64, block_size=16)
    context = model.config.max_position_embeddings
    engine.check_context(10, context - 10)  # exactly fills the context
    for prompt_len, max_tokens, param in [(context, 1, "prompt"), (10, context - 9, "max_tokens")]:
        with pytest.raises(ContextLengthError, match="prompt: .*context") as e:
            engine.check_context(prompt_len, max_tokens)
        assert e.value.param == param
    with pytest.raises(ContextLengthError, match="prompts\\[2\\]: .*max_tokens asks for") as e:
        engine.make_request([5] * 10, SamplingParams(max_tokens=context), what="prompts[2]")  # no silent clamp
    assert e.value.param == "max_tokens"


def test_default_max_tokens_fills_context_or_cache(model):
    context = model.config.max_position_embeddings
    roomy = LLMEngine(model, num_blocks=64, block_size=16)  # 1024 cached tokens > context
    assert roomy.default_max_tokens(10) == context - 10
    assert roomy.default_max_tokens(context) == 1  # no room: the checks refuse the prompt, not SamplingParams
    small = LLMEngine(model, num_blocks=4, block_size=8)  # 32 cached tokens: 33 in all, the last never cached
    assert small.default_max_tokens(10) == 23
    small.make_request([5] * 10, SamplingParams(max_tokens=small.default_max_tokens(10)))  # fits exactly
    with pytest.raises(ValueError, match="more than the whole cache"):
        small.make_request([5] * 10, SamplingParams(max_tokens=24))


def test_stats_count_requests_blocks_and_tokens(model):
    engine = LLMEngine(model, max_running=2, num_blocks=32, block_size=4)
    first = engine.stats()
    assert (first.running, first.waiting, first.blocks_used, first.blocks_total) == (0, 0, 0, 32)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for p in PROMPTS[:3]:  # 3, 41 and 1 tokens
        engine.add_request(engine.make_request(p, params))
    engine.step()
    s = engine.stats()
    assert (s.running, s.waiting) == (2, 1)
    assert s.cached_tokens == 3 + 41 and s.blocks_used == 1 + 11 == s.step_blocks_used
    assert s.totals["prefill_tokens"] == 44 and s.totals["decode_tokens"] == 0 and s.totals["steps"] == 1
    while engine.has_unfinished():
        engine.step()
    s = engine.stats()
    assert (s.running, s.waiting, s.blocks_used, s.cached_tokens) == (0, 0, 0, 0)
    assert s.totals["prefill_tokens"] == 45 and s.totals["decode_tokens"] == 3 * 2
    assert s.cache_bytes_allocated == 32 * 4 * s.cache_bytes_per_token


# ------------------------------------------------------------------------------------- prefix caching
def test_block_pool_keys_content_by_its_whole_prefix_and_evicts_least_recent():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    first = pool.claim(a, ROOT, (1, 2))
    pool.claim(b, first, (3, 4))
    assert pool.match([1, 2, 3, 4, 5], 2, 2) == ([], [], True)  # pending: computed by its owner, not shared yet
    pool.computed(a)
    pool.computed(b)
    assert pool.match([1, 2, 3, 4, 5], 2, 2)[0] == [a, b]
    assert pool.match([3, 4, 1, 2], 2, 2)[0] == []  # the same tokens after another prefix are other content
    assert pool.match([1, 2, 3, 9], 2, 2)[0] == [a]
    pool.free([a, b])
    assert pool.num_free == 4 and pool.num_cached == 2  # evictable: free to take, content kept
    c, d = pool.allocate(2)  # the plainly free blocks go first
    assert {c, d}.isdisjoint({a, b}) and pool.match([1, 2, 3, 4], 2, 2)[0] == [a, b]
    (e,) = pool.allocate(1)  # then the least recently used: b (a prefix outlives its continuation)
    assert e == b and pool.match([1, 2, 3, 4], 2, 2)[0] == [a] and pool.num_cached == 1
    pending = pool.allocate(1)
    pool.claim(pending[0], ROOT, (7, 7))
    pool.free(pending)  # let go before it was computed: its content is forgotten, never shared
    assert pool.match([7, 7, 0], 2, 1) == ([], [], False)


def shared_seq(name: str, prefix: list[int], tail: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(name, prefix + tail, len(prefix) + len(tail), max_tokens)


def test_a_sequence_starts_after_the_prefix_others_computed_and_waits_for_one_in_progress():
    sched = Scheduler(num_blocks=64, block_size=4, prefill_chunk=8, max_prefill_tokens=16, prefix_caching=True)
    system = list(range(100, 116))  # 16 tokens: 4 full blocks
    sched.add(shared_seq("a", system, [1, 2, 3]))
    sched.add(shared_seq("b", system, [4, 5]))
    # a computes the prefix in chunks of 8; b, whose first block a is computing, waits instead of recomputing it
    assert run_plan(sched)[1] == [("a", 8)]
    assert run_plan(sched)[1] == [("a", 8)]
    assert run_plan(sched)[1] == [("a", 3), ("b", 2)]  # b starts at 16: only its own tail is computed
    a, b = sched.running
    assert b.blocks[:4] == a.blocks[:4] and all(sched.allocator.refs(x) == 2 for x in a.blocks[:4])
    assert b.blocks[4] != a.blocks[4] and sched.allocator.hit_tokens == 16
    for s in (a, b):
        sched.finish(s)
    assert sched.allocator.num_free == 64 and sched.allocator.num_cached > 0  # all free or evictable
    sched.add(shared_seq("c", system, [1, 2, 3]))  # a's whole prompt cached but its last token: 16 + 0
    assert run_plan(sched)[1] == [("c", 3)]
    sched.add(shared_seq("d", system[:8], []))  # 8 tokens, 2 full blocks: the last one is computed anyway
    assert run_plan(sched)[1] == [("d", 4)]


def test_a_preempted_sequence_recomputes_only_what_was_evicted():
    sched = Scheduler(num_blocks=4, block_size=4, prefill_chunk=16, max_prefill_tokens=16, prefix_caching=True)
    sched.add(seq("old", 7, max_tokens=8))
    sched.add(Sequence("new", list(range(50, 57)), 7, 8))
    run_plan(sched)
    run_plan(sched)
    assert run_plan(sched)[2] == ["new"]  # its blocks become evictable, its first block's content kept
    assert sched.allocator.num_cached >= 1
    while sched.running:
        run_plan(sched)
        if sched.running[0].num_generated >= 8:
            sched.finish(sched.running[0])
    new = sched.running[0] if sched.running else sched.waiting[0]
    assert new.request_id == "new" and new.num_computed - new.num_generated < 9


# ------------------------------------------------------------------------------- prefix caching: engine
_UNCHECKED_WRITE = _PagedLayer.write


def no_shared_writes(monkeypatch, engine: LLMEngine) -> list[int]:
    """Fail on any cache write into a block whose content others may read; the written blocks."""
    pool, written = engine.scheduler.allocator, []
    write = _UNCHECKED_WRITE

    def checked(self, positions, entries):
        blocks = self.tables.gather(1, positions // self.pool.shape[2]).flatten().tolist()
        for b in blocks:
            assert not pool.is_shared_content(b) and pool.refs(b) == 1, f"block {b} written while shared"
        written.extend(blocks)
        return write(self, positions, entries)

    monkeypatch.setattr(_PagedLayer, "write", checked)
    return written


@pytest.mark.parametrize("num_blocks", [64, 9])  # 9 blocks of 8: preemption and eviction too
def test_prefix_caching_gives_the_same_greedy_tokens_and_never_writes_a_shared_block(model, monkeypatch, num_blocks):
    system = list(range(10, 50))  # 40 tokens shared by every prompt: 5 blocks of 8
    prompts = [system + [200 + i] * (i + 1) for i in range(5)] + [system[:24], list(range(60, 75))]
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)]

    def run(prefix_caching: bool) -> tuple[list[list[int]], LLMEngine, list[int]]:
        engine = LLMEngine(model, num_blocks=num_blocks, block_size=8, prefill_chunk=16, max_prefill_tokens=32,
                           max_running=4, prefix_caching=prefix_caching)
        written = no_shared_writes(monkeypatch, engine)
        requests = [engine.make_request(p, params[i % 2]) for i, p in enumerate(prompts)]
        requests += [engine.make_request(system + [7], params[1]) for _ in range(3)]  # n = 3 samples of one prompt
        drain(engine, requests)
        again = [engine.make_request(p, params[0]) for p in prompts[:2]]  # after finishing: the cache is warm
        drain(engine, again)
        return [r.out.token_ids for r in requests + again], engine, written

    plain, _, _ = run(False)
    cached, engine, written = run(True)
    assert cached == plain
    s = engine.stats()
    assert (s.totals["preemptions"] > 0) == (num_blocks == 9)
    assert s.totals["prefix_hit_tokens"] >= 40 * 5 and s.totals["prefill_tokens"] < sum(map(len, prompts)) * 2
    assert s.blocks_used == 0 and s.blocks_cached > 0 and written  # all free or evictable; the check ran
    assert all(engine.scheduler.allocator.refs(b) == 0 for b in range(num_blocks))


def test_prefix_caching_off_and_requests_that_need_every_position(model):
    engine = LLMEngine(model, num_blocks=64, block_size=8, prefix_caching=False)
    drain(engine, [engine.make_request(list(range(40)), SamplingParams(max_tokens=2)) for _ in range(2)])
    assert engine.stats().totals["prefix_hit_tokens"] == 0 and engine.stats().blocks_cached == 0
    engine = LLMEngine(model, num_blocks=64, block_size=8)
    drain(engine, [engine.make_request(list(range(40)), SamplingParams(max_tokens=2))])
    scored = engine.make_request(list(range(40)), SamplingParams(max_tokens=1, prompt_logprobs=0))
    routed = engine.make_request(list(range(40)), SamplingParams(max_tokens=1), record_routing=True)
    drain(engine, [scored, routed])
    assert engine.stats().totals["prefix_hit_tokens"] == 0  # both computed every position
    assert len(scored.out.prompt_logprobs) == 40 and routed.out.routing.shape[0] == 40
