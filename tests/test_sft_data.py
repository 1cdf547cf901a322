"""SFT data: JSONL conversations (messages or prompt/completion) -> examples with reply masks -> padded batches."""

from __future__ import annotations

import json

import pytest
import torch

import dsv2
from dsv2.data.corpus import DataError
from dsv2.data.sft import ChatBatches, Example, encode_conversations, read_conversations, split_validation
from dsv2.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6, héllo 世界"}],
    [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "blue"}],
]


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer.byte_level(dsv2.preset("nano"))


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_reads_messages_and_prompt_completion_rows(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hello"}]},
        "",
        {"prompt": "2+2?", "completion": "4", "id": 7},
    ])
    assert read_conversations(path) == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    ]


GOOD = {"prompt": "p", "completion": "c"}


@pytest.mark.parametrize("row, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    ({"text": "hi"}, "neither"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\]\.role must be system, user or assistant"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
     r"messages\[1\]\.content must be a string, got NoneType"),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
    ({"messages": "hi"}, "messages must be a list"),
    ({"messages": []}, "messages is empty"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"prompt": "p", "completion": 3}, "completion must be a string, got int"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", row])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: {message}"):
        read_conversations(path)


def test_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match=r"empty\.jsonl: no conversations"):
        read_conversations(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n\xe9\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        read_conversations(tmp_path / "latin1.jsonl")


def test_batch_weights_are_the_reply_mask_shifted(tok):
    examples, counts = encode_conversations(CONVERSATIONS, tok, seq_len=96)
    assert counts == {"conversations": 3, "kept": 3, "truncated": 0, "dropped": 0,
                      "target_tokens": sum(sum(tok.encode_chat(c)[1]) for c in CONVERSATIONS)}
    batch = ChatBatches(examples, seq_len=96, pad_id=7, shuffle=False).next_batch(3)
    longest = max(len(e.ids) for e in examples) - 1  # padded to the batch's longest, not to seq_len
    assert longest < 96
    assert batch.inputs.shape == batch.targets.shape == batch.weights.shape == batch.token_mask.shape == (3, longest)
    assert batch.weights.dtype == torch.float32 and batch.token_mask.dtype == torch.bool
    for row, messages in enumerate(CONVERSATIONS):
        ids, mask = tok.encode_chat(messages)
        n = len(ids) - 1
        assert batch.inputs[row, :n].tolist() == ids[:-1] and batch.targets[row, :n].tolist() == ids[1:]
        assert batch.weights[row, :n].tolist() == [float(m) for m in mask[1:]]
        # what the weights pick out is exactly the replies and their EOS
        picked = [t for t, w in zip(ids[1:], mask[1:], strict=True) if w]
        replies = [f" {m['content']}" for m in messages if m["role"] == "assistant"]
        eos = tok.hf.id_to_token(tok.eos_id)
        assert tok.hf.decode(picked, skip_special_tokens=False) == eos.join(replies) + eos
        # padding: no weight, not a real token, pad ids
        assert batch.token_mask[row, :n].all() and not batch.token_mask[row, n:].any()
        assert not batch.weights[row, n:].any()
        assert (batch.inputs[row, n:] == 7).all() and (batch.targets[row, n:] == 7).all()


def test_drop_and_truncate_counts(tok):
    lengths = [len(tok.encode_chat(c)[0]) for c in CONVERSATIONS]
    seq_len = sorted(lengths)[1] - 1  # the two shorter ones fit, the longest does not
    examples, counts = encode_conversations(CONVERSATIONS, tok, seq_len, overflow="drop")
    assert [len(e.ids) for e in examples] == [n for n in lengths if n <= seq_len + 1]
    assert counts["kept"] == 2 and counts["dropped"] == 1 and counts["truncated"] == 0
    examples, counts = encode_conversations(CONVERSATIONS, tok, seq_len, overflow="truncate")
    assert counts["kept"] == 3 and counts["dropped"] == 0 and counts["truncated"] == 1
    assert max(len(e.ids) for e in examples) == seq_len + 1
    long = CONVERSATIONS[lengths.index(max(lengths))]
    assert examples[CONVERSATIONS.index(long)].mask == tok.encode_chat(long)[1][: seq_len + 1]
    # truncated before the first reply: no target left, so dropped, and with nothing left an error saying why
    with pytest.raises(DataError, match=r"all 3 conversations were dropped .* raise --seq-len"):
        encode_conversations(CONVERSATIONS, tok, seq_len=8, overflow="truncate")
    with pytest.raises(DataError, match=r"longest has \d+ tokens; seq_len 8 fits 9\); raise --seq-len, or truncate"):
        encode_conversations(CONVERSATIONS, tok, seq_len=8)


def test_state_round_trip_resumes_the_same_batches(tok):
    examples, _ = encode_conversations(CONVERSATIONS * 3, tok, seq_len=96)
    source = ChatBatches(examples, seq_len=96, pad_id=0, seed=3)
    source.next_batch(4)
    source.next_batch(4)  # 8 of 9 examples: the next batch straddles epochs 0 and 1
    state = json.loads(json.dumps(source.state_dict()))
    expected = [source.next_batch(b) for b in (4, 2, 5)]
    restored = ChatBatches(examples, seq_len=96, pad_id=0, seed=3)
    restored.load_state_dict(state)
    for b, want in zip((4, 2, 5), expected, strict=True):
        got = restored.next_batch(b)
        assert all(torch.equal(g, w) for g, w in zip(
            (got.inputs, got.targets, got.weights, got.token_mask),
            (want.inputs, want.targets, want.weights, want.token_mask), strict=True))
    # each epoch visits every example once, in a different order
    fresh = ChatBatches(examples, seq_len=96, pad_id=0, seed=3)
    assert sorted(fresh.order(0)) == sorted(fresh.order(1)) == list(range(9)) and fresh.order(0) != fresh.order(1)
    with pytest.raises(DataError, match="seed is 3 but this source's is 4"):
        ChatBatches(examples, seq_len=96, pad_id=0, seed=4).load_state_dict(state)


def test_split_validation_is_seeded_and_keeps_a_train_example():
    examples = [Example([0, i, 1], [False, True, True]) for i in range(20)]
    train, val = split_validation(examples, fraction=0.1, seed=1)
    assert len(val) == 2 and len(train) == 18 and sorted(train + val, key=lambda e: e.ids) == examples
    assert split_validation(examples, fraction=0.1, seed=1) == (train, val)
    assert split_validation(examples[:1], fraction=0.5) == (examples[:1], [])
