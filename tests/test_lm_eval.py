"""lm-evaluation-harness as the real client: its `local-completions` / `local-chat-completions` models against a live
`dsv2 serve`, and the in-process `dsv2` model class, on the example tasks in examples/lm_eval (local JSON data, no
hub). Every per-sample loglikelihood must equal dsv2's own full-forward computation on the same token ids, and
every generation dsv2's own greedy output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import require

import dsv2
from dsv2 import LLM, SamplingParams
from dsv2.tokenizer import Tokenizer

lm_eval = require("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from dsv2.harness import DSV2LM  # noqa: E402

TASKS = Path(__file__).parents[1] / "examples" / "lm_eval"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random nano model folder as `dsv2 init` writes it (float32, so the server's sums match to 1e-4)."""
    path = tmp_path_factory.mktemp("lm_eval") / "nano"
    path.mkdir()
    model = dsv2.load_model("nano", seed=0).float()
    dsv2.save_model(model, path, progress=False)
    Tokenizer.byte_level(model.config).save(path)
    return path


def split_pair(tokenizer: Tokenizer, context: str, continuation: str, bos: bool) -> tuple[list[int], list[int]]:
    """lm-eval's rule: trailing spaces of the context move to the continuation; the continuation's ids are those
    of the whole text after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tokenizer.encode(context + continuation, add_bos=bos), tokenizer.encode(context, add_bos=bos)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def own_loglikelihood(llm: LLM, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One plain forward: the sum of the continuation's log p, and whether each token is the argmax."""
    ids = context + continuation
    logprobs = llm.model(torch.tensor([ids[:-1]]))[0, len(context) - 1 :].float().log_softmax(-1)
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def test_in_process_model_scores_like_a_full_forward(folder):
    lm = DSV2LM(pretrained=str(folder), dtype="float32", batch_size=4)
    llm = lm.llm
    pairs = [("Question: What do bees make?\nAnswer:", " honey"), ("2 + 2 =", " 4"), ("", "hello"),
             ("A long context " * 20 + "ends", " here and now")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (ll, greedy) in zip(pairs, got, strict=True):
        ctx, cont = split_pair(lm.tokenizer, context, continuation, bos=True) if context else (
            [lm.tokenizer.bos_id], lm.tokenizer.encode(continuation, add_bos=False))
        want, want_greedy = own_loglikelihood(llm, ctx, cont)
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    # a continuation made of each position's argmax is greedy, and scored so
    prompt = lm.tokenizer.encode("abc")
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0))[0]
    (ll, greedy), = lm._loglikelihood_tokens([(None, prompt, out.token_ids)])
    assert greedy and ll == pytest.approx(own_loglikelihood(llm, prompt, out.token_ids)[0], abs=1e-4)
    text, = lm.generate_until([Instance("generate_until", {}, ("def f():", {"until": ["\n"], "max_gen_toks": 6}), 0)])
    assert text == llm.generate("def f():", SamplingParams(max_tokens=6, temperature=0, stop=["\n"]))[0].text


# --------------------------------------------------------------------------------------- the real client
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lm_eval_run(args: list[str], out: Path, module: str = "lm_eval") -> dict[str, list[dict]]:
    """Run lm-eval's command line (`python -m dsv2.harness` is lm-eval's with `dsv2` registered); the logged
    samples by task, and its printed table on stdout."""
    cmd = [sys.executable, "-m", module, "run", *args, "--include_path", str(TASKS), "--output_path",
           str(out), "--log_samples", "--device", "cpu"]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    print(done.stdout)
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    return samples


@pytest.fixture(scope="module")
def server(folder):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv2.cli", "serve", str(folder), "--port", str(port), "--dtype", "float32",
         "--served-model-name", "nano", "--log-level", "warning"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "dsv2 serve did not start"
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def scores(sample: dict) -> list[float]:
    return [float(r[0][0]) for r in sample["resps"]]


@pytest.mark.slow
def test_lm_eval_against_dsv2_serve_and_in_process(server, folder, tmp_path):
    """The multiple-choice task through /v1/completions (echo + logprobs, token-id prompts batched 4 to a
    request, BOS from the saved tokenizer's post-processor), the generation task through /v1/chat/completions
    with lm-eval's --apply_chat_template, and both in process: per-sample figures equal to dsv2's own."""
    llm = LLM(folder, dtype="float32")
    tokenizer = llm.tokenizer
    served = lm_eval_run(["--model", "local-completions", "--tasks", "dsv2_mc", "--batch_size", "4", "--model_args",
                          f"model=nano,base_url={server}/v1/completions,tokenizer={folder},"
                          "tokenizer_backend=huggingface,add_bos_token=True,max_length=512"], tmp_path / "served")
    chat = lm_eval_run(["--model", "local-chat-completions", "--tasks", "dsv2_gen", "--apply_chat_template",
                        "--model_args", f"model=nano,base_url={server}/v1/chat/completions"], tmp_path / "chat")
    local = lm_eval_run(["--model", "dsv2", "--tasks", "dsv2_mc,dsv2_gen", "--batch_size", "8", "--model_args",
                         f"pretrained={folder},dtype=float32"], tmp_path / "local", module="dsv2.harness")
    assert len(served["dsv2_mc"]) == len(local["dsv2_mc"]) == 6 and len(chat["dsv2_gen"]) == 4
    for remote, here in zip(served["dsv2_mc"], local["dsv2_mc"], strict=True):
        assert remote["doc_id"] == here["doc_id"]
        args = [remote["arguments"][f"gen_args_{i}"] for i in range(len(remote["resps"]))]
        want = [own_loglikelihood(llm, *split_pair(tokenizer, a["arg_0"], a["arg_1"], bos=True))[0] for a in args]
        assert scores(remote) == pytest.approx(want, abs=1e-4)
        assert scores(here) == pytest.approx(want, abs=1e-4)
        assert remote["acc"] == here["acc"] and remote["acc_norm"] == here["acc_norm"]
    for sample in chat["dsv2_gen"]:
        (logged,) = sample["arguments"]["gen_args_0"]["arg_0"]  # the chat lm-eval sent, as JSON
        messages = json.loads(logged)
        own = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0, stop=["\n"])).text
        assert sample["resps"][0][0] == own
    for sample in local["dsv2_gen"]:
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        assert sample["resps"][0][0] == llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0,
                                                                            stop=["\n"]))[0].text
