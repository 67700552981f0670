"""Preference data: TRL's three formats, completion masks, truncation, batches that resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.data.prefs import PairBatches, PrefDataConfig, collate_pairs, encode_pair, load_pref_data, load_preferences
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer
from helpers import write_jsonl

PROMPT = [{"role": "user", "content": "alpha beta?"}]
CHOSEN = [{"role": "assistant", "content": "gamma delta."}]
REJECTED = [{"role": "assistant", "content": "gamma delta"}]


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model)


def test_explicit_and_implicit_prompts_render_the_same_pair(tok: Tokenizer):
    explicit = encode_pair(tok, {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, 0)
    implicit = encode_pair(tok, {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED}, 0)
    assert explicit == implicit
    full = tok.render_chat(PROMPT + CHOSEN, add_generation_prompt=False)
    assert explicit.prompt + explicit.chosen == full.ids
    # The prompt ends with the assistant header; the answer's tokens (content and <|end|>) are all trained.
    assert explicit.prompt == tok.apply_chat_template(PROMPT, add_generation_prompt=True)
    assert explicit.chosen_mask == [1] * len(explicit.chosen)


def test_string_pairs_are_bos_prompt_answer_eos_and_only_the_answer_is_trained(tok: Tokenizer):
    pair = encode_pair(tok, {"prompt": "alpha beta", "chosen": " gamma", "rejected": " delta", "margin": 2}, 7)
    assert pair.prompt == [tok.bos_id] + tok.encode("alpha beta", add_special_tokens=False)
    assert pair.chosen == tok.encode(" gamma", add_special_tokens=False) + [tok.eos_id]
    assert pair.chosen_mask == [1] * len(pair.chosen) and pair.margin == 2.0 and pair.index == 7
    implicit = encode_pair(tok, {"chosen": "alpha beta gamma", "rejected": "alpha beta delta"}, 0)
    assert tok.decode(implicit.prompt, skip_special_tokens=True) == "alpha beta "


def test_a_batch_holds_both_answers_of_each_pair_and_masks_only_answers(tok: Tokenizer):
    pairs = [
        encode_pair(tok, {"prompt": "alpha", "chosen": " beta gamma", "rejected": " delta", "kind": "x"}, 0),
        encode_pair(tok, {"prompt": "alpha beta gamma delta", "chosen": " mu", "rejected": " eta eta"}, 1),
    ]
    batch = collate_pairs(pairs, pad_id=tok.pad_id)
    assert batch["input_ids"].shape[0] == 4 and batch["index"].tolist() == [0, 1]
    for row, (pair, answer) in enumerate([(p, p.chosen) for p in pairs] + [(p, p.rejected) for p in pairs]):
        n = len(pair.prompt) + len(answer)
        assert batch["input_ids"][row, :n].tolist() == pair.prompt + answer
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["completion_mask"][row, : len(pair.prompt)].sum() == 0
        assert batch["completion_mask"][row].sum() == len(answer)
    assert pairs[0].meta == {"kind": "x"}


def test_long_prompts_are_cut_from_the_left_or_dropped_and_counted(tok: Tokenizer, tmp_path: Path):
    records = [
        {"prompt": "alpha " * 30, "chosen": " beta", "rejected": " gamma"},
        {"prompt": "alpha", "chosen": " beta " * 40, "rejected": " gamma"},
        {"prompt": "alpha", "chosen": " beta", "rejected": " gamma"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    pairs, stats = load_pref_data(path, tok, max_length=20)
    assert (stats.records, stats.kept, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert all(p.length <= 20 for p in pairs) and [p.index for p in pairs] == [0, 2]
    assert pairs[0].prompt[-3:] == encode_pair(tok, records[0], 0).prompt[-3:]  # the end of the prompt is kept
    _, strict = load_pref_data(path, tok, max_length=20, truncation="drop")
    assert (strict.kept, strict.dropped) == (1, 2)
    _, short = load_pref_data(path, tok, max_length=100, max_prompt_length=4)
    assert (short.kept, short.truncated) == (3, 1)
    assert "dropped 1 longer than 20 tokens" in stats.warning(path, 20)


@pytest.mark.parametrize(
    "record, words",
    [
        ({"prompt": "alpha", "chosen": " beta"}, ["needs 'chosen' and 'rejected'"]),
        ({"prompt": "alpha", "chosen": " beta", "rejected": " beta"}, ["same answer"]),
        ({"prompt": 3, "chosen": " beta", "rejected": " gamma"}, ["'prompt' must be a string or a list"]),
        ({"prompt": "alpha", "chosen": CHOSEN, "rejected": REJECTED}, ["string 'prompt' needs string"]),
        ({"prompt": "a", "chosen": " b", "rejected": " c", "margin": "big"}, ["'margin' must be a number"]),
    ],
)
def test_a_bad_record_is_one_line_naming_file_and_line(tok: Tokenizer, tmp_path: Path, record: dict, words: list):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}, record])
    with pytest.raises(UserError) as error:
        load_pref_data(path, tok, max_length=64)
    message = str(error.value)
    assert "\n" not in message and f"{path}:2:" in message
    assert all(w in message for w in words), message


def test_the_quick_worlds_pairs_load_whole(tok: Tokenizer, quick_world: Path):
    data = PrefDataConfig(train=str(quick_world / "prefs/train.jsonl"), val=str(quick_world / "prefs/test.jsonl"))
    train, val, stats = load_preferences(data, tok, max_length=384, warn=False)
    records = [json.loads(line) for line in (quick_world / "prefs/train.jsonl").read_text().splitlines()]
    assert stats["train"].records == len(records) and len(train) == stats["train"].kept > 0.9 * len(records)
    assert 0 < len(val) == stats["val"].kept
    assert all(p.meta["kind"] == records[p.index]["kind"] for p in train)


def test_batches_resume_exactly_and_split_steps_over_ranks(tok: Tokenizer):
    pairs = [
        encode_pair(tok, {"prompt": "alpha " * (i % 5 + 1), "chosen": " beta", "rejected": " mu"}, i) for i in range(7)
    ]

    def source(rank=0, world_size=1, micro=2):
        return PairBatches(pairs, micro_batch_size=micro, pad_id=tok.pad_id, seed=3, rank=rank, world_size=world_size)

    whole = source(micro=4)
    halves = [source(rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # crosses epochs (7 pairs, 4 per step)
        expected = whole.next_batch()["index"].tolist()
        assert [i for h in halves for i in h.next_batch()["index"].tolist()] == expected
    a = source()
    for _ in range(3):
        a.next_batch()
    b = source()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(4):
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
