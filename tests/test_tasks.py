"""Verifiable tasks: rewards, deterministic rows, disjoint train/eval problems, prompt files, user rewards,
reward checks and evaluation through the chat template."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest

from dsv2.config import preset
from dsv2.data.corpus import DataError
from dsv2.data.tasks import (
    FORMAT_CREDIT,
    TASKS,
    Addition,
    check_rewards,
    evaluate,
    get_task,
    in_eval_split,
    load_reward,
    prompt_rows,
    read_prompts,
    reward_columns,
    sft_rows,
    write_jsonl,
)
from dsv2.infer.engine import LLM
from dsv2.tokenizer import Tokenizer


def test_known_tasks_and_unknown_name():
    assert {"addition", "compare"} <= set(TASKS)
    assert get_task("addition") is TASKS["addition"]
    with pytest.raises(ValueError, match="unknown task 'mul'.*addition, compare"):
        get_task("mul")
    with pytest.raises(ValueError, match="digits"):
        Addition(digits=0)


@pytest.mark.parametrize(("name", "prompt", "answer"), [
    ("addition", "What is 47+38?", "85"),
    ("compare", "Which is larger: 47 or 38?", "47"),
])
def test_rewards_correct_wrong_malformed(name, prompt, answer):
    task = get_task(name)
    completions = [answer, f"  {answer}\n", f"{answer}. Done", "12", " 12 ", "12 is it", "", "no idea", "-"]
    expected = [1.0, 1.0, 1.0, FORMAT_CREDIT, FORMAT_CREDIT, 0.0, 0.0, 0.0, 0.0]
    assert task.reward([prompt] * len(completions), completions, answer=[answer] * len(completions),
                       trainer_state=None) == expected  # unknown keyword columns are ignored
    with pytest.raises(ValueError, match="`answer` column"):
        task.reward([prompt], [answer])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        task.reward([prompt] * 2, [answer] * 2, answer=[answer])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_problems_are_correct(name):
    task = get_task(name)
    for row in prompt_rows(task, 50, seed=3):
        a, b = map(int, re.findall(r"\d+", row["messages"][0]["content"]))
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert int(row["answer"]) == (a + b if name == "addition" else max(a, b))
        if name == "compare":
            assert a != b


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rows_deterministic_and_sft_answer_gets_full_reward(name):
    task = get_task(name)
    rows = prompt_rows(task, 20, seed=7)
    assert rows == prompt_rows(task, 20, seed=7) and rows != prompt_rows(task, 20, seed=8)
    assert all(row["messages"][0]["role"] == "user" and set(row) == {"messages", "answer"} for row in rows)
    sft = sft_rows(task, 20, seed=7)
    assert sft == sft_rows(task, 20, seed=7)
    assert [row["messages"][0] for row in sft] == [row["messages"][0] for row in rows]  # same problems
    assert all(row["messages"][1]["role"] == "assistant" for row in sft)
    users = [row["messages"][0]["content"] for row in sft]
    replies = [row["messages"][1]["content"] for row in sft]
    assert task.reward(users, replies, **reward_columns(rows)) == [1.0] * 20


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_and_eval_problems_are_disjoint(name):
    task = get_task(name)
    train = {row["messages"][0]["content"] for row in prompt_rows(task, 500, seed=0)}
    held_out = {row["messages"][0]["content"] for row in prompt_rows(task, 100, seed=0, split="eval")}
    assert not train & held_out
    assert all(in_eval_split(p) for p in held_out) and not any(in_eval_split(p) for p in train)
    with pytest.raises(ValueError, match="split"):
        prompt_rows(task, 1, seed=0, split="test")


def test_write_jsonl_round_trips_through_read_prompts(tmp_path):
    rows = prompt_rows(get_task("addition"), 5, seed=0)
    path = tmp_path / "prompts.jsonl"
    write_jsonl(rows, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert read_prompts(path) == rows


def test_read_prompts_both_formats_and_extra_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    system = {"role": "system", "content": "Be brief."}
    path.write_text(
        json.dumps({"prompt": "What is 1+1?", "answer": "2", "level": 1}) + "\n\n"
        + json.dumps({"messages": [system, {"role": "user", "content": "Hi"}], "answer": "3", "level": 2}) + "\n"
    )
    rows = read_prompts(path)
    assert rows == [
        {"messages": [{"role": "user", "content": "What is 1+1?"}], "answer": "2", "level": 1},
        {"messages": [system, {"role": "user", "content": "Hi"}], "answer": "3", "level": 2},
    ]
    assert reward_columns(rows) == {"answer": ["2", "3"], "level": [1, 2]}


GOOD = json.dumps({"prompt": "ok", "answer": "1"})


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"answer": "1"}', "exactly one of the fields 'prompt'.*or 'messages'"),
    ('{"prompt": "a", "messages": [], "answer": "1"}', "exactly one of the fields"),
    ('{"prompt": 3, "answer": "1"}', "field 'prompt' must be a non-empty string"),
    ('{"messages": "hi", "answer": "1"}', "messages must be a list"),
    ('{"messages": [], "answer": "1"}', "messages is empty"),
    ('{"messages": ["hi"], "answer": "1"}', r"messages\[0\] must be an object"),
    ('{"messages": [{"role": "bot", "content": "x"}], "answer": "1"}', r"messages\[0\].role must be system, user"),
    ('{"messages": [{"role": "user", "content": 5}], "answer": "1"}', r"messages\[0\].content must be a string"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "1"}',
     "ends with an assistant turn"),
    ('{"prompt": "b", "completions": [], "answer": "1"}', "'completions' is the reward's own parameter"),
    ('{"prompt": "b"}', r"extra columns \[\] differ from line 1's \['answer'\]"),
    ('{"prompt": "b", "answer": "1", "level": 2}', r"\['answer', 'level'\] differ from line 1's"),
])
def test_read_prompts_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n")  # the bad row is on line 3, after a blank line
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: .*{message}"):
        read_prompts(path)


def test_read_prompts_file_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=f"^{re.escape(str(empty))}: no prompts"):
        read_prompts(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(GOOD.encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"^{re.escape(str(latin))}:2: not UTF-8"):
        read_prompts(latin)


def test_load_reward_from_module_and_file(tmp_path):
    assert load_reward("dsv2.data.tasks:check_rewards") is check_rewards
    file = tmp_path / "my_reward.py"
    file.write_text(
        "from dataclasses import dataclass\n\n"
        "@dataclass\nclass Weight:\n    value: float = 0.5\n\n"  # needs the module registered by name
        "def length_reward(prompts, completions, **columns):\n"
        "    return [Weight().value * len(c) for c in completions]\n\n"
        "NOT_A_FUNCTION = 3\n"
    )
    reward = load_reward(f"{file}:length_reward")
    assert reward(["p", "q"], ["ab", "abcd"]) == [1.0, 2.0]


@pytest.mark.parametrize(("spec", "message"), [
    ("dsv2.data.tasks", "expected MODULE:FUNCTION"),
    ("dsv2.data.tasks:", "expected MODULE:FUNCTION"),
    ("dsv2.data.tasks:no_such_reward", "has no attribute 'no_such_reward'"),
    ("dsv2.data.tasks:FORMAT_CREDIT", "is a float, not a function"),
    ("no_such_package_xyz.rewards:f", "cannot import module 'no_such_package_xyz.rewards'"),
    ("{tmp}/missing.py:f", "no such file"),
    ("{tmp}/broken.py:f", "importing .*broken.py failed .*ZeroDivisionError"),
    ("{tmp}/ok.py:g", "has no attribute 'g'"),
])
def test_load_reward_errors(tmp_path, spec, message):
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    (tmp_path / "ok.py").write_text("def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ValueError, match=message):
        load_reward(spec.format(tmp=tmp_path))


def test_check_rewards():
    assert check_rewards([1, 0.5, True], 3, "r") == [1.0, 0.5, 1.0]
    assert check_rewards((0.0,), 1, "r") == [0.0]
    for values, message in [
        ([1.0], "returned 1 values for 2 completions"),
        ([1.0, None], "r: reward 1 is None"),
        ([1.0, float("nan")], "reward 1 must be a finite number"),
        ([float("inf"), 1.0], "reward 0 must be a finite number"),
        ([1.0, "1"], "reward 1 must be a finite number, got '1'"),
        ("11", "must return a list of 2 numbers, got str"),
        (None, "must return a list of 2 numbers, got NoneType"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_rewards(values, 2, "r")


def test_check_rewards_accepts_tensors():
    import torch

    assert check_rewards(torch.tensor([1.0, 0.0]), 2, "r") == [1.0, 0.0]


@dataclass
class FakeOutput:
    text: str


class SolvingLLM:
    """Answers each problem correctly, reading it back from the token ids it is given: so it passes only if
    evaluate sends the chat-templated prompts, batched, greedily."""

    def __init__(self):
        self.tokenizer = Tokenizer.byte_level(preset("nano"))
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        outputs = []
        for ids in prompts:
            assert ids[0] == self.tokenizer.bos_id
            text = self.tokenizer.decode(ids)
            match = re.fullmatch(r"User: (.*)\n\nAssistant:", text)
            assert match, text
            a, b = map(int, re.findall(r"\d+", match.group(1)))
            answer = a + b if "+" in match.group(1) else max(a, b)
            outputs.append(FakeOutput(f" {answer}"))  # as a model says it after "Assistant:"
        return outputs


@pytest.mark.parametrize("name", sorted(TASKS))
def test_evaluate_counts_correct_answers(name):
    llm = SolvingLLM()
    result = evaluate(llm, get_task(name), n=30, seed=5, max_tokens=8)
    assert result["task"] == name and result["n"] == 30
    assert result["accuracy"] == 1.0 and result["mean_reward"] == 1.0
    assert len(llm.calls) == 1 and len(llm.calls[0][0]) == 30  # one batched call
    params = llm.calls[0][1]
    assert params.temperature == 0 and params.max_tokens == 8
    example = result["examples"][0]
    assert len(result["examples"]) == 5 and example["reward"] == 1.0
    assert example["completion"].strip() == example["answer"]
    assert in_eval_split(example["prompt"])


def test_evaluate_random_nano_model():
    llm = LLM("nano", dtype="float32")
    result = evaluate(llm, get_task("addition"), n=6, max_tokens=4)
    assert result["n"] == 6 and 0.0 <= result["accuracy"] <= 1.0
    assert 0.0 <= result["mean_reward"] <= 1.0
    assert len(result["examples"]) == 5 and all(isinstance(e["completion"], str) for e in result["examples"])
    with pytest.raises(ValueError, match="n must be >= 1"):
        evaluate(llm, get_task("addition"), n=0)
