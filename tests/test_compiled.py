"""The compiled decode step (`dsv2.infer.compiled`) against its eager twin: the sync-free pieces it is made of
(each slot's expert gathered, every expert weighted by its gate, a span given instead of read, the cache written
in place), then whole engines, compiled and eager, generating the same tokens with the same logprobs, for each
way the graph runs the experts (dsv2's CPU kernel, gathered per slot, every expert on every token, the opaque
experts op, and a batch graph that changes way as the batch shrinks), and after the weights change."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from conftest import PROMPTS, random_model, randomize_

import dsv2
from dsv2 import LLM, SamplingParams, hardware
from dsv2.infer import compiled
from dsv2.infer.cache import PagedLatentCache
from dsv2.model import cpu_kernels, quant
from dsv2.model.moe import RoutedExperts, register_for_compile, routed_experts_op


@pytest.mark.parametrize("twin", ["every_expert", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_the_sync_free_twins_equal_the_dispatched_experts(dtype, twin):
    """Every expert weighted by its gate, and each slot's expert gathered, against `dispatch`: 9 tokens, top-2 of
    6 experts, shared experts and dropped slots (id -1, computed by no expert)."""
    experts = RoutedExperts(6, 32, 16).to(dtype)
    for w in (experts.w1, experts.w2, experts.w3):
        w.normal_(0, 0.3)
    x = torch.randn(9, 32, dtype=dtype)
    weights = torch.rand(9, 2)
    indices = torch.stack([torch.randperm(6)[:2] for _ in range(9)])
    indices[2, 1] = indices[5, 0] = -1
    ours, dispatched = getattr(experts, twin)(x, weights, indices), experts.dispatch(x, weights, indices)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert (ours.float() - dispatched.float()).abs().max() <= tolerance * dispatched.float().abs().max()


def test_which_weights_the_twins_take():
    experts = RoutedExperts(6, 32, 16).to(torch.bfloat16)
    assert experts.stacked(torch.bfloat16) and not experts.stacked(torch.float16)  # another dtype: not indexed
    assert experts.runs_every_expert(torch.bfloat16)
    experts.EVERY_EXPERT_MAX_ELEMENTS = 3 * 6 * 32 * 16 - 1
    assert not experts.runs_every_expert(torch.bfloat16)


def test_gathering_stops_where_duplicate_reads_cost_more_than_dispatching():
    """`gather_max_rows` grows with the dispatch cost and shrinks with the experts' size: `small`'s experts
    (32 of 256 x 1024, top-4) gather decode batches of 8, V2-Lite's (64 of 1408 x 2048, top-6) only up to 3."""
    small, lite = RoutedExperts(32, 1024, 256).to(torch.bfloat16), RoutedExperts(64, 2048, 1408).to(torch.bfloat16)
    assert small.gather_max_rows(4) >= 8 and 1 <= lite.gather_max_rows(6) < 8
    lite.DISPATCH_COST_BYTES = 0
    assert lite.gather_max_rows(6) == 1  # one row's slots are distinct experts: nothing read twice
    small.DISPATCH_COST_BYTES *= 1000
    assert small.gather_max_rows(4) == small.MAX_GATHER_ROWS


@torch.no_grad()
def test_a_span_given_attends_like_the_span_read():
    """Rows of different lengths over a table wider than any of them: the mask hides what the span covers past
    each row's own positions, so the logits equal those of the default span (the largest position + 1)."""
    model = random_model("v2_like")
    model.prepare_for_inference()
    cache = PagedLatentCache(model.config, num_blocks=16, block_size=4)
    tables, lengths = [[1, 2, 3], [4, 5, 6, 7, 8], [9]], [9, 3, 2]
    for table, n in zip(tables, lengths, strict=True):  # fill each row's prefix
        model(torch.randint(2, 300, (1, n)), cache=cache.view([table], [0]))
    tokens = torch.tensor([[7], [8], [9]])
    read = model(tokens, cache=cache.view(tables, lengths))
    given_view = cache.view(tables, lengths, min_width=6)
    given = model(tokens, cache=given_view, span=given_view.capacity)
    assert torch.allclose(given, read, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="span 25"):
        model(tokens, cache=given_view, span=25)


@pytest.fixture()
def quick_compile(monkeypatch):
    """Frozen weights without autotuning: the same graphs, compiled in seconds rather than a minute."""
    monkeypatch.setattr(compiled, "AUTOTUNED", compiled.FROZEN)


def generate_both(model, prompts, params):
    out = {}
    for compile_decode in (False, True):
        llm = LLM(model, max_batch_size=3, skip_tokenizer_init=True, compile_decode=compile_decode)
        out[compile_decode] = llm.generate(prompts, params)
    return out[False], out[True], llm


def assert_same(eager, compiled_out, tolerance=1e-4):
    """The same greedy tokens, with logprobs within `tolerance` (fp32)."""
    assert [o.token_ids for o in eager] == [o.token_ids for o in compiled_out]
    for a, b in zip(eager, compiled_out, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=tolerance)


# how the graph runs the experts: (rows gathered at most, every-expert limit); v2_like's tiny experts gather any
# batch by default; "mixed" gathers 2 rows and 1 but runs 3 through the op, so the batch graph compiles again when
# the batch shrinks (the default suite's fp32 case for both; each alone is slow-marked); "kernel" is dsv2's own
# (`cpu_kernels`, bf16 on a CPU with AVX-512 BF16), which every other path is run without
EXPERT_PATHS = {"gathered": (None, 1 << 20), "every_expert": (0, 1 << 20), "op": (0, 0), "mixed": (2, 0),
                "kernel": (None, 1 << 20)}


@pytest.mark.parametrize(("path", "dtype"), [("mixed", torch.float32), ("every_expert", torch.float32),
                                             ("kernel", torch.bfloat16),
                                             pytest.param("gathered", torch.bfloat16, marks=pytest.mark.slow),
                                             pytest.param("gathered", torch.float32, marks=pytest.mark.slow),
                                             pytest.param("op", torch.float32, marks=pytest.mark.slow)])
def test_compiled_engine_generates_what_the_eager_engine_does(quick_compile, monkeypatch, path, dtype):
    """4 prompts of different lengths through 3 slots: batches of 3, 2 and 1 rows, rows joining and leaving,
    tables growing past a block, for each way the graph runs the experts. In fp32 greedy tokens and logprobs
    must agree. In bf16 the two round their own ways (inductor fuses away roundings eager makes), so each is
    held against the fp32 model: the compiled engine no further from it than the eager one."""
    gather, every = EXPERT_PATHS[path]
    if path == "kernel" and not (cpu_kernels.load() and cpu_kernels.loaded_bf16()):
        pytest.skip("dsv2's bf16 experts kernel needs a CPU with AVX-512 BF16 (and a build that works)")
    if path != "kernel":
        monkeypatch.setattr(RoutedExperts, "KERNEL_MAX_ROWS", 0)
    if gather is not None:
        monkeypatch.setattr(RoutedExperts, "gather_max_rows", lambda self, top_k: gather)
    monkeypatch.setattr(RoutedExperts, "EVERY_EXPERT_MAX_ELEMENTS", every)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2)
    model = random_model("v2_like", dtype)
    eager, compiled_out, llm = generate_both(model, PROMPTS, params)
    assert llm.engine.stats().totals["decode_tokens"] > 0 and llm.stats()["decode"] == "compiled"
    if dtype == torch.float32:
        assert_same(eager, compiled_out)
    else:
        exact = LLM(model.float(), max_batch_size=3, skip_tokenizer_init=True).generate(PROMPTS, params)
        eager_off, eager_n = deviation(exact, eager)
        compiled_off, compiled_n = deviation(exact, compiled_out)
        assert compiled_off <= 1.5 * eager_off + 0.01 and compiled_n >= 0.75 * eager_n, (compiled_off, eager_off)


def deviation(reference, outputs) -> tuple[float, int]:
    """The largest logprob difference from `reference` over the tokens each output shares with it before they
    part, and how many tokens that is."""
    differences = []
    for a, b in zip(reference, outputs, strict=True):
        for i, (mine, theirs) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            if mine != theirs:
                break
            differences.append(abs(a.logprobs[i] - b.logprobs[i]))
    return max(differences), len(differences)


# three prompts of different lengths, prefilled in one step and decoded in lock-step to the end: one batch graph
LOCKSTEP_PROMPTS = [[5, 17, 99], list(range(30, 43)), list(range(100, 107))]


@pytest.mark.parametrize("quantization", [
    pytest.param(quantization, marks=pytest.mark.skipif(not cpu_kernels.supported(), reason="needs dsv2's kernels"))
    for quantization in ("w8a8", "w4a8", "bf16")
])
def test_compiled_kernel_formats_decode_generates_what_the_eager_engine_does(quick_compile, quantization):
    """int8 or int4 weights with int8 activations, or bf16 weights with fp32 ones, in the compiled decode step, their
    linears on dsv2's kernels: held, as the bf16 case above, against the unquantized fp32 model, no further from it
    than the eager engine in the same format. The int8 formats in the CPU's native dtype (bf16 with AVX-512 BF16, else
    fp32); bf16 weights on an fp32 model, the one it is for, on every CPU. (Rows joining and leaving the batch are
    the test above's; here the kernels' rows are the three prompts', in one graph.)"""
    assert cpu_kernels.load()
    dtype = torch.float32 if quantization == "bf16" else hardware.resolve_dtype("auto")
    model = dsv2.weights.random_model(dsv2.preset("nano").replace(q_lora_rank=128), dtype=dtype, seed=0)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    exact = LLM(deepcopy(model).float(), max_batch_size=3, skip_tokenizer_init=True).generate(LOCKSTEP_PROMPTS, params)
    out = {}
    for compile_decode in (False, True):
        llm = LLM(deepcopy(model), quantization=quantization, max_batch_size=3, skip_tokenizer_init=True,
                  compile_decode=compile_decode)
        torch._dynamo.utils.counters.clear()
        out[compile_decode] = llm.generate(LOCKSTEP_PROMPTS, params)
    assert llm.stats()["decode"] == "compiled"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the batch of three, in lock-step
    eager_off, eager_n = deviation(exact, out[False])
    compiled_off, compiled_n = deviation(exact, out[True])
    assert compiled_off <= 1.5 * eager_off + 0.01 and compiled_n >= 0.75 * eager_n, \
        (compiled_off, compiled_n, eager_off, eager_n)


def test_compiled_engine_follows_new_weights(quick_compile):
    """The weights are constants of the graph: after new weights are prepared, the engine compiles again
    rather than decoding with the old ones."""
    model = random_model("lite_like")
    llm = LLM(model, max_batch_size=2, skip_tokenizer_init=True, compile_decode=True)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    before = llm.generate(PROMPTS[:2], params)
    randomize_(model, std=0.12)
    model.prepare_for_inference()
    after = llm.generate(PROMPTS[:2], params)
    eager = LLM(model, max_batch_size=2, skip_tokenizer_init=True).generate(PROMPTS[:2], params)
    assert_same(eager, after)
    assert [o.token_ids for o in before] != [o.token_ids for o in after]


def test_compiled_prefill_fills_the_cache_as_the_eager_one(quick_compile):
    """Prefill steps compiled wherever their chunks are equal: one prompt alone (chunks of 8 and 5 tokens, the
    second over the first's cache), three equal prompts in lock-step (a batch of rows), a prompt whose prefix is
    cached from an earlier request; uneven chunks stay eager, packed. The decode steps (eager) read the cache the
    compiled prefill wrote: the same tokens and logprobs as an all-eager engine."""
    model = random_model("v2_like")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    alone, equal = [list(range(40, 53))], [list(range(60 + 7 * i, 81 + 7 * i)) for i in range(3)]
    uneven = [list(range(2, 7)), list(range(120, 127))]  # chunks of 5 and 7 in one step
    later = [list(range(40, 53)) + [7, 8, 9]]  # the first 12 tokens (3 blocks of 4) are cached by then
    out, shapes = {}, []
    for compile_prefill in (False, True):
        llm = LLM(model, max_batch_size=3, skip_tokenizer_init=True, block_size=4, prefill_chunk=8,
                  compile_prefill=compile_prefill)
        if compile_prefill:
            prefill = llm.engine.compiled_prefill
            llm.engine.compiled_prefill = lambda tokens, view, run=prefill: shapes.append(tuple(tokens.shape)) or run(
                tokens, view)
        out[compile_prefill] = [o for batch in (alone, equal, uneven, later) for o in llm.generate(batch, params)]
    assert llm.stats()["prefill"] == "compiled"
    assert {(1, 8), (1, 5), (3, 8), (3, 5), (1, 4)} == set(shapes), shapes
    assert_same(out[False], out[True])


def test_compiled_decode_refuses_what_it_cannot_run():
    model = random_model("lite_like")
    model.prepare_for_inference()
    step = compiled.CompiledDecode(model)
    cache = PagedLatentCache(model.config, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="one new token per row"):
        step(torch.tensor([[3, 4]]), cache.view([[1, 2]], [0], min_width=2))
    with pytest.raises(ValueError, match="two tokens or more"):
        compiled.CompiledPrefill(model)(torch.tensor([[3]]), cache.view([[1, 2]], [0], min_width=2))
    model.prepare_for_inference()
    with pytest.raises(RuntimeError, match="prepared again"):
        step(torch.tensor([[3]]), cache.view([[1, 2]], [0], min_width=2))
    with pytest.raises(ValueError, match="CPU only"):
        compiled.CompiledDecode(random_model("lite_like").to("meta"))
    quantized = quant.quantize_model(random_model("lite_like"), "int8")  # weight-only int8 does not trace
    with pytest.raises(ValueError, match="float weights"):
        compiled.CompiledDecode(quantized)
    quant.for_inference(quantized, "w8a8")  # in w8a8 a decode step takes it (on an AMX CPU), a prefill does not
    with pytest.raises(ValueError, match=r"float weights \(bf16, fp16, fp32\): .* is torch.int8"):
        compiled.CompiledPrefill(quantized)



@torch.no_grad()
def test_the_experts_op_dispatches_the_module_it_was_keyed_to():
    """`dsv2::routed_experts` equals the eager dispatch, and a deep copy keyed again is its own module: a copy
    made after keying carries the original's key until the copy is compiled (keyed) itself."""
    experts = RoutedExperts(6, 32, 16)
    for w in (experts.w1, experts.w2, experts.w3):
        w.normal_(0, 0.3)
    register_for_compile(experts)
    copy = deepcopy(experts)
    copy.w1.mul_(2.0)
    register_for_compile(copy)
    assert copy.op_key != experts.op_key
    x, weights = torch.randn(5, 32), torch.rand(5, 2)
    indices = torch.stack([torch.randperm(6)[:2] for _ in range(5)])
    assert torch.equal(routed_experts_op(x, weights, indices, experts.op_key), experts.dispatch(x, weights, indices))
    assert torch.equal(routed_experts_op(x, weights, indices, copy.op_key), copy.dispatch(x, weights, indices))
