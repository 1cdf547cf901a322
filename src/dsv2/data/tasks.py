"""Verifiable tasks: problems with one exact answer, for SFT (worked examples), GRPO (prompts + a reward)
and eval (accuracy), plus the user's own rewards (`load_reward`) and prompt files (`read_prompts`).

    task = get_task("addition")
    sft_rows(task, 1000, seed=0)       # [{"messages": [user, assistant]}, ...] for `dsv2 sft`
    prompt_rows(task, 256, seed=0)     # [{"messages": [user], "answer": "85"}, ...] for `dsv2 grpo --task`
    evaluate(llm, task)                # {"accuracy": ..., ...} for `dsv2 eval --task`

The tasks are sized for a ~1-5M parameter model trained for minutes on two CPU cores: a prompt of a
dozen characters and an answer of two or three digits.

- "addition": "What is 47+38?" -> "85". Two 2-digit operands (10..99): 8100 problems.
- "compare": "Which is larger: 47 or 38?" -> "47". Two different 2-digit numbers: 8010 problems. Only
  copying is needed, not arithmetic, so it is the first thing a tiny model learns; a model that has only
  learned the answer's format already scores about 0.5, which is the baseline to beat. (Reversing a
  word was the other candidate; a BPE vocabulary merges letters into tokens, so a tiny model would have
  to learn the spelling of each token first.)

Reward (TRL's signature, `reward(prompts, completions, answer=[...], **other_columns)`): a completion is
parsed leniently, as its first integer anywhere (whitespace, a trailing full stop or more text after it
do not matter). 1.0 when that integer equals the answer; `FORMAT_CREDIT` (0.1) when it does not but the
whole completion is just an integer, the form the model should learn, so GRPO has a gradient towards it
before the model can solve anything; 0.0 otherwise. Accuracy counts only rewards of 1.0.

Train and eval problems never overlap: seeds alone cannot promise that (a few thousand problems, and
thousands of training rows), so every problem belongs to one split, by a hash of its prompt
(`in_eval_split`: `EVAL_FRACTION` of them are eval problems). `prompt_rows` and `sft_rows` draw train
problems unless told otherwise, `evaluate` draws eval problems; within a split, problems may repeat.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import os
import random
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dsv2.atomic import write_text_atomic
from dsv2.data.corpus import DataError, jsonl_records
from dsv2.data.sft import validate_messages
from dsv2.infer.sampling import SamplingParams

RewardFunction = Callable[..., list[float]]  # reward(prompts, completions, **columns) -> one float per completion

FORMAT_CREDIT = 0.1  # reward of a completion that is only an integer, but the wrong one
EVAL_FRACTION = 0.1  # share of each task's problems kept for eval
SPLITS = ("train", "eval")
MAX_DRAWS = 10_000  # draws to find a problem of the asked split before the task is judged too small
RESERVED_COLUMNS = ("prompts", "completions")  # the reward's own parameters: a column cannot take their names

_INTEGER = re.compile(r"-?\d+")


class Task:
    """A family of problems with exact answers: `sample` makes one, `reward` scores completions of them."""

    name: ClassVar[str]
    description: str

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """One problem: {"prompt": user message text, "answer": canonical answer string, ...extra columns}."""
        raise NotImplementedError

    def score(self, completion: str, answer: str) -> float:
        """The reward of one completion (see the module docstring)."""
        raise NotImplementedError

    def reward(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        """One reward per completion; reads the `answer` column, ignores the rest (TRL passes more)."""
        answers = columns.get("answer")
        if answers is None:
            raise ValueError(f"task {self.name}: the reward needs an `answer` column")
        if len(answers) != len(completions):
            raise ValueError(f"task {self.name}: {len(completions)} completions but {len(answers)} answers")
        return [self.score(c, a) for c, a in zip(completions, answers, strict=True)]


class IntegerTask(Task):
    """A task whose answer is an integer, scored by the lenient first-integer rule."""

    def score(self, completion: str, answer: str) -> float:
        found = _INTEGER.search(completion)
        if found is None:
            return 0.0
        if int(found.group()) == int(answer):
            return 1.0
        return FORMAT_CREDIT if _INTEGER.fullmatch(completion.strip()) else 0.0


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1), 10**digits)


@dataclass(frozen=True)
class Addition(IntegerTask):
    name: ClassVar[str] = "addition"
    digits: int = 2

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise ValueError(f"addition: digits must be >= 1, got {self.digits}")

    @property
    def description(self) -> str:
        return f"add two {self.digits}-digit numbers: 'What is 47+38?' -> '85'"

    def sample(self, rng: random.Random) -> dict[str, Any]:
        a, b = _operand(rng, self.digits), _operand(rng, self.digits)
        return {"prompt": f"What is {a}+{b}?", "answer": str(a + b)}


@dataclass(frozen=True)
class Compare(IntegerTask):
    name: ClassVar[str] = "compare"
    digits: int = 2

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise ValueError(f"compare: digits must be >= 1, got {self.digits}")

    @property
    def description(self) -> str:
        return f"the larger of two different {self.digits}-digit numbers: 'Which is larger: 47 or 38?' -> '47'"

    def sample(self, rng: random.Random) -> dict[str, Any]:
        a = _operand(rng, self.digits)
        b = _operand(rng, self.digits)
        while b == a:
            b = _operand(rng, self.digits)
        return {"prompt": f"Which is larger: {a} or {b}?", "answer": str(max(a, b))}


TASKS: dict[str, Task] = {task.name: task for task in (Addition(), Compare())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ------------------------------------------------------------------------------------------------ rows
def in_eval_split(prompt: str) -> bool:
    """Whether a problem is kept for eval: a hash of its prompt, so the same on every machine and run."""
    return zlib.crc32(prompt.encode("utf-8")) < EVAL_FRACTION * 2**32


def draw(task: Task, rng: random.Random, split: str = "train") -> dict[str, Any]:
    """One problem of `split` ("train" or "eval"): samples until one falls in it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for _ in range(MAX_DRAWS):
        problem = task.sample(rng)
        if in_eval_split(problem["prompt"]) == (split == "eval"):
            return problem
    raise ValueError(f"task {task.name}: no {split} problem in {MAX_DRAWS} draws; the task has too few problems")


def prompt_rows(task: Task, n: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """n GRPO/eval rows {"messages": [user turn], "answer": ..., **extra columns}; the same for the same seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        problem = draw(task, rng, split)
        prompt = problem.pop("prompt")
        rows.append({"messages": [{"role": "user", "content": prompt}], **problem})
    return rows


def sft_rows(task: Task, n: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """n worked examples {"messages": [user, assistant]}: the assistant says the canonical answer, nothing more."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        problem = draw(task, rng, split)
        rows.append({"messages": [{"role": "user", "content": problem["prompt"]},
                                  {"role": "assistant", "content": problem["answer"]}]})
    return rows


def reward_columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """The columns a reward receives as keyword lists: every key of the rows but "messages"."""
    return {key: [row[key] for row in rows] for key in rows[0] if key != "messages"} if rows else {}


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ------------------------------------------------------------------------------------------ prompt files
def read_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A GRPO prompt file: one JSON object a line, {"prompt": "text"} or {"messages": [...]}, plus any extra
    columns, which the reward receives as keyword lists (so every row must have the same ones).

    Rows come back as {"messages": [...], **extra columns}: a "prompt" becomes a single user turn, since
    every prompt goes through the chat template. Messages have a role (system, user or assistant) and a
    string content, and the last is not an assistant turn: the model writes the assistant's reply. Blank
    lines are skipped; anything else wrong is a `DataError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[dict[str, Any]] = []
    first_columns: tuple[int, set[str]] | None = None  # (line, extra column names) of the first row
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        row = _prompt_row(record, where)
        extra = set(row) - {"messages"}
        if first_columns is None:
            first_columns = (number, extra)
        elif extra != first_columns[1]:
            raise DataError(f"{where}: extra columns {sorted(extra)} differ from line {first_columns[0]}'s "
                            f"{sorted(first_columns[1])}; every row must have the same ones")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return rows


def _prompt_row(record: Any, where: str) -> dict[str, Any]:
    """One validated line of a prompt file, its prompt as `messages`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if ("prompt" in record) == ("messages" in record):
        raise DataError(f"{where}: needs exactly one of the fields 'prompt' (a string) or 'messages' (a list)")
    for name in RESERVED_COLUMNS:
        if name in record:
            raise DataError(f"{where}: field {name!r} is the reward's own parameter; rename the column")
    row = dict(record)
    if "prompt" in row:
        prompt = row.pop("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r}")
        return {"messages": [{"role": "user", "content": prompt}], **row}
    row["messages"] = messages = validate_messages(row["messages"], where)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'messages' ends with an assistant turn; the model writes that one")
    return row


# ------------------------------------------------------------------------------------------ user rewards
def load_reward(spec: str) -> RewardFunction:
    """"package.module:function" or "path/to/file.py:function" -> that function."""
    module_name, sep, attr = spec.rpartition(":")  # rpartition: a Windows path has a colon of its own
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        module = _import_file(Path(module_name), spec)
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # an ImportError, or any error the module raises as it runs
            raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from e
    function = getattr(module, attr, None)
    if function is None:
        raise ValueError(f"reward {spec!r}: {module_name} has no attribute {attr!r}")
    if not callable(function):
        raise ValueError(f"reward {spec!r}: {module_name}.{attr} is a {type(function).__name__}, not a function")
    return function


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise ValueError(f"reward {spec!r}: no such file {path}")
    name = f"dsv2_reward_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward {spec!r}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # as `import` would: dataclasses and pickle look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"reward {spec!r}: importing {path} failed ({type(e).__name__}: {e})") from e
    return module


def check_rewards(values: Any, n: int, where: str) -> list[float]:
    """A reward function's result as n finite floats. TRL lets a reward return None for "not applicable";
    here that is an error, so a function that skips completions is noticed rather than averaged as NaN."""
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{where}: the reward must return a list of {n} numbers, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{where}: the reward returned {len(values)} values for {n} completions")
    rewards = []
    for i, v in enumerate(values):
        if v is None:
            raise ValueError(f"{where}: reward {i} is None; return a number (0.0) for every completion")
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{where}: reward {i} must be a finite number, got {v!r}")
        rewards.append(float(v))
    return rewards


# ------------------------------------------------------------------------------------------------ eval
def evaluate(llm: Any, task: Task, n: int = 100, seed: int = 1234, max_tokens: int = 16) -> dict[str, Any]:
    """Greedy answers to n eval problems, through the chat template, in one batched `llm.generate` call.

    `llm` is a `dsv2.infer.engine.LLM` (or anything with its `tokenizer` and `generate`). Returns
    {"task", "n", "accuracy" (share of rewards of 1.0), "mean_reward", "examples" (the first five)}.
    """
    if n < 1:
        raise ValueError(f"evaluate: n must be >= 1, got {n}")
    if llm.tokenizer is None:
        raise ValueError("evaluate: the model has no tokenizer to apply the chat template with")
    rows = prompt_rows(task, n, seed, split="eval")
    ids = [llm.tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True) for row in rows]
    outputs = llm.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0))
    prompts = [row["messages"][-1]["content"] for row in rows]
    completions = [out.text for out in outputs]
    columns = reward_columns(rows)
    rewards = check_rewards(task.reward(prompts, completions, **columns), n, where=f"task {task.name}")
    examples = [
        {"prompt": p, "completion": c, "answer": a, "reward": r}
        for p, c, a, r in zip(prompts[:5], completions, columns["answer"], rewards, strict=False)
    ]
    return {
        "task": task.name, "n": n, "accuracy": sum(r == 1.0 for r in rewards) / n,
        "mean_reward": sum(rewards) / n, "examples": examples,
    }
