"""SFT: the chat template (Python == transformers), loss masks, packing, learning, resume, chat, bad input."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.align.sft import SftConfig, SftDataConfig, SftTrainConfig, load_config, sft, token_losses
from gptlab.chat import ChatSession, fit_history, run_chat
from gptlab.data.chat import ChatBatches, collate, encode_record, fit, load_chat_data
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.model import GPT, ModelConfig
from gptlab.runs import RunFolder
from gptlab.tokenizer import ASSISTANT, CHAT_TEMPLATE, END, SYSTEM, USER, Tokenizer
from helpers import (
    KILL_AFTER_FIRST_SAVE,
    ONE_THREAD,
    assert_user_error,
    gptlab,
    gptlab_in_process,
    run_python,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("on_one_thread")  # conftest: tiny models run fastest on one thread

SYSTEM_PROMPT = "Answer in one sentence."
CONVERSATIONS = [
    [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Where was Zoste born?"},
        {"role": "assistant", "content": "Zoste was born in Fetel."},
        {"role": "user", "content": "Reverse plomet."},
        {"role": "assistant", "content": "The answer is temolp."},
    ],
    [
        {"role": "user", "content": "Add 12 and 35."},
        {"role": "assistant", "content": "The answer is 47."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "The answer is 47."},
    ],
    [
        {"role": "user", "content": "In which country is Fetel?"},
        {"role": "assistant", "content": "Fetel is in Peiszandea."},
    ],
    [
        {"role": "user", "content": "Multiply 6 by 7. café 東京 🙂"},
        {"role": "assistant", "content": "The answer is 42."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "The answer is 42."},
    ],
]
# "Again." has two answers after the same (empty) system message: a model can only give the right
# one if the prompt holds the history.


def texts() -> list[str]:
    return [m["content"] for c in CONVERSATIONS for m in c] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(texts(), vocab_size=320)


@pytest.fixture(scope="module")
def base(tok: Tokenizer, tmp_path_factory) -> Path:
    """A randomly initialised model folder with the tokenizer, the `init` of an SFT run."""
    folder = tmp_path_factory.mktemp("base") / "model"
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=48))
    model.save_pretrained(folder, tokenizer=tok)
    return folder


# ----------------------------------------------------------------------------- the chat template


def test_python_rendering_equals_transformers_ids_mask_and_generation_prompt(tok: Tokenizer, base: Path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(base)
    assert hf.chat_template == CHAT_TEMPLATE
    odd = [
        {"role": "user", "content": "  spaces\naround  "},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "<|end|> inside"},
        {"role": "assistant", "content": " 🙂\n"},
    ]
    for messages in CONVERSATIONS + [odd]:
        ours = tok.render_chat(messages)
        theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ours.ids
        assert theirs["assistant_masks"] == ours.assistant_mask
        assert sum(ours.assistant_mask) > 0
        prompt = messages[:-1]  # ends with a user turn: the prompt for the next reply
        assert hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ] == tok.apply_chat_template(prompt, add_generation_prompt=True)
        assert tok.apply_chat_template(prompt, add_generation_prompt=True)[-1] == tok.token_to_id(ASSISTANT)


def test_the_template_is_saved_in_both_places_and_survives_a_reload(tok: Tokenizer, base: Path, tmp_path: Path):
    assert (base / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert json.loads((base / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    Tokenizer.from_pretrained(base).save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    # A foreign tokenizer (no chat tokens) keeps the template it came with.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, trainers

    foreign = HFTokenizer(models.BPE())
    foreign.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=100))
    foreign.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == "{{ messages }}"
    with pytest.raises(UserError, match="no chat tokens"):
        loaded.render_chat(CONVERSATIONS[1])


def test_the_mask_covers_exactly_the_replies_and_their_end_token(tok: Tokenizer):
    messages = CONVERSATIONS[0]
    chat = tok.render_chat(messages)
    trained = [i for i, m in zip(chat.ids, chat.assistant_mask) if m]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = sum((tok.encode(r, add_special_tokens=False) + [tok.token_to_id(END)] for r in replies), [])
    assert trained == expected
    headers = {tok.token_to_id(t) for t in (SYSTEM, USER, ASSISTANT)}
    assert not any(m for i, m in zip(chat.ids, chat.assistant_mask) if i in headers or i == tok.bos_id)
    # No system or user text is trained: decoding the untrained tokens gives back all of it.
    context = tok.decode([i for i, m in zip(chat.ids, chat.assistant_mask) if not m], skip_special_tokens=True)
    assert context == "".join(m["content"] for m in messages if m["role"] != "assistant")
    assert chat.message_ends[-1] == len(chat.ids)


def test_prompt_completion_records(tok: Tokenizer):
    text = encode_record(tok, {"prompt": "Add 12 and 35.", "completion": " The answer is 47."})
    prompt_len = 1 + len(tok.encode("Add 12 and 35.", add_special_tokens=False))
    assert text.ids[0] == tok.bos_id and text.ids[-1] == tok.eos_id
    assert text.mask == [0] * prompt_len + [1] * (len(text.ids) - prompt_len)
    # Conversational: the completion's reply is trained, a reply inside the prompt is context.
    prompt, completion = CONVERSATIONS[0][:4], CONVERSATIONS[0][4:]
    record = encode_record(tok, {"prompt": prompt, "completion": completion})
    whole = tok.render_chat(CONVERSATIONS[0])
    assert record.ids == whole.ids
    last = whole.message_ends[-2]
    assert record.mask == [0] * last + whole.assistant_mask[last:]
    assert sum(record.mask) < sum(whole.assistant_mask)


# ----------------------------------------------------------------------------- skipping and truncation


def test_skips_and_truncations_are_counted(tok: Tokenizer, tmp_path: Path):
    long_reply = {"role": "assistant", "content": "Zoste was born in Fetel. " * 12}
    records = [
        {"messages": CONVERSATIONS[1]},
        {"messages": [{"role": "user", "content": "Hello?"}]},  # nothing to train on
        {"messages": CONVERSATIONS[0][:3] + [CONVERSATIONS[0][3], long_reply]},  # too long: cut after reply 1
        {"messages": [CONVERSATIONS[1][0], long_reply]},  # too long, no reply fits
    ]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    first_reply_end = tok.render_chat(CONVERSATIONS[0][:3]).message_ends[-1]
    assert len(tok.render_chat(records[2]["messages"]).ids) > 64 >= first_reply_end
    examples, stats = load_chat_data(path, tok, max_len=64, truncation="turn")
    assert (stats.records, stats.kept, stats.truncated, stats.no_assistant, stats.too_long) == (4, 2, 1, 1, 1)
    assert examples[1].ids == tok.render_chat(CONVERSATIONS[0][:3]).ids
    assert all(len(e.ids) <= 64 for e in examples)
    warning = stats.warning(path, 64)
    assert "1 with no assistant reply" in warning and "1 longer than 64" in warning and "truncated 1" in warning
    examples, stats = load_chat_data(path, tok, max_len=64, truncation="drop")
    assert (stats.kept, stats.truncated, stats.no_assistant, stats.too_long) == (1, 0, 1, 2)
    assert (
        load_chat_data(path, tok, max_len=200)[1].warning(path, 200)
        == f"{path}: of 4 conversations, skipped 1 with no assistant reply; 3 used"
    )


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', ["data.jsonl:2", "not valid JSON"]),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', ["data.jsonl:2", "unknown role 'bot'"]),
        ('{"messages": [{"role": "user", "content": 3}]}', ["data.jsonl:2", "content"]),
        ('{"text": "hi"}', ["data.jsonl:2", "'messages'"]),
        ('{"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]}', ["data.jsonl:2", "both"]),
        ("[1, 2]", ["data.jsonl:2", "JSON object"]),
    ],
)
def test_a_bad_record_names_file_and_line(tok: Tokenizer, tmp_path: Path, line: str, words: list[str]):
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": CONVERSATIONS[1]}, line])
    with pytest.raises(UserError) as e:
        load_chat_data(path, tok, max_len=64)
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_packed_batch_gives_the_per_token_losses_of_each_conversation_alone(tok: Tokenizer, family: str):
    torch.manual_seed(1)
    model = GPT(
        ModelConfig(family=family, vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32)
    ).eval()
    examples = [encode_record(tok, {"messages": c}) for c in CONVERSATIONS]
    seq_len = 120
    packed = ChatBatches(examples, seq_len=seq_len, micro_batch_size=2, pad_id=tok.pad_id, packing=True)
    rows = packed.rows_of(0)
    assert sum(len(r) for r in rows) == len(examples) and any(len(r) > 1 for r in rows)  # several per row
    batch = collate(examples, rows, seq_len, tok.pad_id, packing=True)
    with torch.no_grad():
        losses = token_losses(model, batch)
        one_by_one = collate(examples, [[i] for i in range(len(examples))], seq_len, tok.pad_id, packing=False)
        padded = token_losses(model, one_by_one)
        for b, row in enumerate(rows):
            at = 0
            for i in row:
                ids = torch.tensor([examples[i].ids])
                n = ids.size(1) - 1
                alone = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")
                trained = torch.tensor(examples[i].mask[1:], dtype=torch.bool)
                assert trained.any()
                torch.testing.assert_close(losses[b, at : at + n][trained], alone[trained], atol=1e-5, rtol=0)
                torch.testing.assert_close(padded[i, :n][trained], alone[trained], atol=1e-5, rtol=0)
                assert (batch["labels"][b, at : at + n] != -100).tolist() == trained.tolist()
                at += n
            assert (batch["labels"][b, at:] == -100).all()  # the padding tail trains nothing


def test_the_batch_source_resumes_exactly_and_splits_steps_over_ranks(tok: Tokenizer):
    examples = [encode_record(tok, {"messages": c}) for c in CONVERSATIONS * 3]

    def source(rank=0, world_size=1, micro=2):
        return ChatBatches(
            examples, seq_len=96, micro_batch_size=micro, pad_id=tok.pad_id, seed=3, rank=rank, world_size=world_size
        )

    a = source()
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(6)]  # crosses epoch boundaries
    b = source()
    b.load_state_dict(json.loads(json.dumps(state)))
    for want in expected:
        got = b.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "labels", "position_ids", "segment_ids"))
    # Two ranks of micro-batch 1 see, together, what one rank of micro-batch 2 sees.
    one, r0, r1 = source(), source(0, 2, 1), source(1, 2, 1)
    for _ in range(4):
        both = one.next_batch()["input_ids"]
        assert torch.equal(torch.cat([r0.next_batch()["input_ids"], r1.next_batch()["input_ids"]]), both)


# ----------------------------------------------------------------------------- training


def sft_config(base: Path, train: Path, **train_overrides) -> SftConfig:
    settings = dict(
        max_steps=120,
        batch_size=4,
        seq_len=96,
        lr=3e-3,
        warmup_steps=10,
        eval_every=0,
        eval_batches=2,
        log_every=20,
        save_every=0,
        seed=0,
        device="cpu",
    )
    settings.update(train_overrides)
    return SftConfig(
        init=str(base), data=SftDataConfig(train=str(train), val=str(train)), train=SftTrainConfig(**settings)
    )


@pytest.fixture(scope="module")
def trained(base: Path, tmp_path_factory) -> Path:
    """An SFT run, through the CLI, on the four conversations plus one with no reply."""
    root = tmp_path_factory.mktemp("sft")
    data = write_jsonl(
        root / "train.jsonl",
        [{"messages": c} for c in CONVERSATIONS] + [{"messages": [{"role": "user", "content": "Hello?"}]}],
    )
    sets = [
        f"init={base}",
        f"data.train={data}",
        f"data.val={data}",
        "train.max_steps=100",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.warmup_steps=10",
        "train.eval_every=50",
        "train.log_every=10",
        "train.device=cpu",
    ]
    result = gptlab("sft", "--out", root / "run", *[a for s in sets for a in ("--set", s)], env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 with no assistant reply" in result.stderr
    return root / "run"


def test_sft_drives_the_loss_of_its_conversations_near_zero(trained: Path):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[0] > 2.0 and losses[-1] < 0.05, losses
    assert len(val) == 2 and val[-1] < 0.05, val
    run = json.loads((trained / "run.json").read_text())
    assert run["data"]["train"] == {"records": 5, "kept": 4, "truncated": 0, "no_assistant": 1, "too_long": 0}
    assert run["config"]["train"]["seq_len"] == 96  # the init model's block size
    model = trained / "model"
    assert (model / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(model)
    hf_model = AutoModelForCausalLM.from_pretrained(model)
    prompt = hf_tok.apply_chat_template(
        CONVERSATIONS[2][:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    reply = hf_model.generate(
        **prompt, max_new_tokens=20, do_sample=False, eos_token_id=hf_tok.convert_tokens_to_ids(END)
    )
    assert (
        hf_tok.decode(reply[0, prompt["input_ids"].size(1) :], skip_special_tokens=True)
        == CONVERSATIONS[2][1]["content"]
    )


def test_chat_from_stdin_answers_each_line_in_order(trained: Path):
    """The trained model replays its conversations turn by turn. "Again." is answered right in
    both conversations only when each prompt carries the exchange before it."""
    conversation = CONVERSATIONS[1]
    stdin = f"{conversation[0]['content']}\n\n{conversation[2]['content']}\n"
    result = gptlab(
        "chat",
        "--model",
        trained / "model",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        stdin=stdin,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{conversation[1]['content']}\n{conversation[3]['content']}\n"
    assert ">" not in result.stdout  # no prompt marker when stdin is not a terminal
    engine = Engine(GPT.from_pretrained(trained / "model"), Tokenizer.from_pretrained(trained / "model"))
    for conversation, system in ((CONVERSATIONS[3], None), (CONVERSATIONS[0], SYSTEM_PROMPT)):
        session = ChatSession(engine, system=system, max_new_tokens=24, temperature=0)
        out = io.StringIO()
        run_chat(session, [m["content"] for m in conversation if m["role"] == "user"], out)
        replies = [m["content"] for m in conversation if m["role"] == "assistant"]
        assert out.getvalue() == "".join(reply + "\n" for reply in replies)
        assert session.messages == conversation


def test_exact_resume(base: Path, tmp_path: Path):
    """Stopped at step 6 and resumed to 12 == 12 straight (a constant learning rate after warmup
    keeps the schedule independent of max_steps)."""
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in CONVERSATIONS])
    settings = dict(max_steps=12, schedule="linear", warmdown_fraction=0.0, warmup_steps=2, eval_every=3)
    sft(sft_config(base, data, **settings), tmp_path / "straight")
    sft(sft_config(base, data, **{**settings, "max_steps": 6}), tmp_path / "resumed")
    sft(sft_config(base, data, **settings), tmp_path / "resumed", resume=True)
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    metrics = [(tmp_path / run / "metrics.jsonl").read_text() for run in ("straight", "resumed")]
    assert [json.loads(line)["val_loss"] for line in metrics[0].splitlines() if "val_loss" in line] == [
        json.loads(line)["val_loss"] for line in metrics[1].splitlines() if "val_loss" in line
    ]


def test_sft_killed_after_a_save_resumes_from_its_run_json(base: Path, tmp_path: Path, monkeypatch):
    """`gptlab sft` SIGKILLed right after its first checkpoint; `gptlab sft --out RUN --resume`, with the
    config read back from run.json, ends with the weights and logs of a run never stopped."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # as a user's shell may set them: the subprocesses still
        monkeypatch.setenv(name, "2")  # run on one thread (ONE_THREAD), as the straight run here does
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in CONVERSATIONS])
    sets = [f"init={base}", f"data.train={data}", f"data.val={data}", "train.device=cpu", "train.lr=3e-3"]
    sets += [
        "train.max_steps=12",
        "train.warmup_steps=2",
        "train.save_every=6",
        "train.eval_every=4",
        "train.log_every=1",
    ]
    sft(load_config(None, sets, tmp_path / "straight", resume=False), tmp_path / "straight")
    out = tmp_path / "run"
    args = ["sft", "--out", out, *[a for s in sets for a in ("--set", s)]]
    killed = run_python("-c", KILL_AFTER_FIRST_SAVE, *args, env=ONE_THREAD)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in RunFolder(out).checkpoints()] == ["step-0000006"] and not (out / "model").exists()
    resumed = gptlab("sft", "--out", out, "--resume", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    straight, got = (load_file(run / "model" / "model.safetensors") for run in (tmp_path / "straight", out))
    assert straight.keys() == got.keys() and all(torch.equal(straight[k], got[k]) for k in straight)
    logged = [
        [{k: v for k, v in json.loads(line).items() if "loss" in k or k == "step"} for line in lines]
        for lines in ((run / "metrics.jsonl").read_text().splitlines() for run in (tmp_path / "straight", out))
    ]
    assert logged[0] == logged[1] and len(logged[0]) == 12  # a loss per step, and val_loss at 4, 8, 12


# ----------------------------------------------------------------------------- chat and errors


def test_chat_drops_the_oldest_exchanges_and_keeps_the_system_message(tok: Tokenizer, base: Path):
    history = CONVERSATIONS[0] + CONVERSATIONS[2]
    budget = len(tok.apply_chat_template([history[0]] + CONVERSATIONS[2][:1], add_generation_prompt=True))
    kept, dropped = fit_history(tok, history[:-1], budget)
    assert kept == [history[0]] + CONVERSATIONS[2][:1] and dropped == 4
    assert fit_history(tok, history[:-1], budget + 100) == (history[:-1], 0)
    notices = []
    model = GPT.from_pretrained(base)
    session = ChatSession(
        Engine(model, tok), system=SYSTEM_PROMPT, max_new_tokens=40, temperature=0, notify=notices.append
    )
    for message in ("Where was Zoste born?", "Add 12 and 35.", "Reverse plomet.", "In which country is Fetel?"):
        "".join(session.reply(message))
        sent = tok.apply_chat_template(session.messages[:-1], add_generation_prompt=True)
        assert len(sent) <= session.budget == 96 - 40
    assert session.messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert any("dropped" in n for n in notices)
    # A message that cannot fit is refused with a notice, and the conversation goes on.
    assert "".join(session.reply("Add 12 and 35. " * 30)) == ""
    assert "too long" in notices[-1]


def test_bad_input_is_one_clear_line(capfd, base: Path, tmp_path: Path):
    bad = write_jsonl(tmp_path / "data.jsonl", [{"messages": CONVERSATIONS[1]}, '{"messages": [{"role": "robot"'])
    assert_user_error(
        gptlab_in_process(
            capfd,
            "sft",
            "--out",
            tmp_path / "r",
            "--set",
            f"init={base}",
            "--set",
            f"data.train={bad}",
            "--set",
            "train.device=cpu",
        ),
        "data.jsonl:2",
        "not valid JSON",
    )
    assert_user_error(
        gptlab_in_process(capfd, "sft", "--out", tmp_path / "r", "--set", "data.truncate=drop"),
        "did you mean 'data.truncation'",
    )
    assert_user_error(gptlab_in_process(capfd, "chat", "--model", base, "--max-new-tokens", "96"), "max_new_tokens 96")

    def error(data: Path | None = None, *overrides: str) -> str:
        sets = [f"init={base}", *([f"data.train={data}"] if data else []), *overrides]
        with pytest.raises(UserError) as e:
            sft(load_config(None, sets, tmp_path / "r", resume=False), tmp_path / "r")
        assert "\n" not in str(e.value)
        return str(e.value)

    unknown_role = write_jsonl(tmp_path / "role.jsonl", ['{"messages": [{"role": "robot", "content": "x"}]}'])
    assert "role.jsonl:1" in error(unknown_role) and "unknown role 'robot'" in error(unknown_role)
    only_questions = write_jsonl(tmp_path / "q.jsonl", [{"messages": CONVERSATIONS[1][:1]}])
    assert "no conversation to train on" in error(only_questions) and "1 with no assistant reply" in error(
        only_questions
    )
    assert "block_size 96" in error(None, "train.seq_len=500")
    assert "does not exist" in error(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="'turn' or 'drop'"):
        load_config(None, ["data.truncation=cut"], tmp_path, resume=False)
    assert not (tmp_path / "r").exists()  # nothing was written before the mistake was found


def test_load_config_defaults_seq_len_to_the_models_block_size(base: Path, tmp_path: Path):
    assert load_config(None, [f"init={base}"], tmp_path, resume=False).train.seq_len == 96
    assert load_config(None, [f"init={base}", "train.seq_len=32"], tmp_path, resume=False).train.seq_len == 32
    assert SftTrainConfig().lr == 3e-4 and SftTrainConfig().schedule == "linear"
    example = encode_record(Tokenizer.from_pretrained(base), {"messages": CONVERSATIONS[0]})
    assert fit(example, 10, "turn") == (None, "too_long")
