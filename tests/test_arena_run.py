"""The arena's judges, tournaments and board (gptlab/arena/judges.py, run.py, board.py), the `gptlab arena`
command, and the batched chat replies that the arena and the demo share (gptlab.chat.chat_replies)."""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from gptlab.arena import judges
from gptlab.arena.battles import WINNERS, Battle
from gptlab.arena.board import COLUMNS
from gptlab.arena.judges import LlmJudge, OracleJudge, RewardJudge, load_judge
from gptlab.arena.run import deal_prompts, play, read_prompts, schedule
from gptlab.arena.store import ArenaStore
from gptlab.chat import ChatSession, chat_replies
from gptlab.data.documents import read_jsonl
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.model import GPT, RewardModel
from gptlab.tokenizer import Tokenizer
from gptlab.world import write_world
from gptlab.world.oracle import Oracle
from helpers import TINY_WORLD, assert_one_line, assert_user_error, gptlab, gptlab_in_process, write_jsonl

pytestmark = pytest.mark.usefixtures("on_one_thread")

CONVERSATIONS = [
    [{"role": "user", "content": "alpha beta"}],
    [{"role": "system", "content": "gamma"}, {"role": "user", "content": "delta epsilon zeta eta"}],
    [{"role": "user", "content": "theta"}],
]
ANSWER_TOKENS = 6  # the tiny models' answers: short, so the tests decode quickly
USER_TEMPLATE = "Q: {question}\nAnswer 1: {answer_1}\nAnswer 2: {answer_2}\n"


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("arena_world") / "world"
    write_world(root, seed=0, preset=TINY_WORLD)
    return root


@pytest.fixture(scope="module")
def other_model(tiny_model: Path, tmp_path_factory) -> Path:
    """tiny_model's architecture and tokenizer with other random weights: a second arena contestant."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("other_model") / "model"
    GPT(GPT.from_pretrained(tiny_model).config).save_pretrained(folder, tokenizer=Tokenizer.from_pretrained(tiny_model))
    return folder


@pytest.fixture(scope="module")
def reward_model(tiny_model: Path, tmp_path_factory) -> Path:
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("reward_model") / "reward"
    RewardModel.from_causal_lm(tiny_model).save_pretrained(folder, tokenizer=Tokenizer.from_pretrained(tiny_model))
    return folder


def prompts_file(path: Path) -> Path:
    """Prompts in each form the arena reads: text, messages, and a chat record whose reply is dropped."""
    return write_jsonl(
        path,
        [
            {"prompt": "alpha beta gamma"},
            {"prompt": [{"role": "user", "content": "delta epsilon"}]},
            {"messages": [{"role": "user", "content": "zeta eta"}, {"role": "assistant", "content": "theta"}]},
        ],
    )


def battle(model_a: str, model_b: str, winner: str, tstamp: float) -> Battle:
    return Battle([{"role": "user", "content": "q"}], model_a, model_b, "x", "y", winner, "oracle", tstamp=tstamp)


# ----------------------------------------------------------------------------- batched replies


def test_chat_replies_in_batches_equal_one_chat_turn_each(tiny_model):
    """Batched, left-padded replies are what `gptlab chat` says to each conversation alone (greedy)."""
    engine = Engine.from_pretrained(tiny_model)
    batched = chat_replies(engine, CONVERSATIONS, max_new_tokens=12, batch_size=2)
    alone = []
    for conversation in CONVERSATIONS:
        system = conversation[0]["content"] if conversation[0]["role"] == "system" else None
        session = ChatSession(engine, system=system, max_new_tokens=12, temperature=0.0)
        alone.append("".join(session.reply(conversation[-1]["content"])))
    assert batched == alone and any(batched)


# ----------------------------------------------------------------------------- scheduling


@pytest.mark.parametrize("battles", [1, 5, 6, 23, 60])
def test_pairs_are_dealt_evenly_and_sides_at_random(battles):
    models = ["a", "b", "c", "d"]
    dealt = schedule(models, battles, random.Random(0))
    assert len(dealt) == battles and all(a != b for a, b in dealt)
    per_pair = Counter(frozenset(pair) for pair in dealt)
    counts = [per_pair[frozenset(pair)] for pair in [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]]
    counts.append(per_pair[frozenset(("c", "d"))])
    assert max(counts) - min(counts) <= 1 and sum(counts) == battles
    assert dealt == schedule(models, battles, random.Random(0))  # seeded


def test_sides_are_a_fair_coin_and_seeded():
    dealt = schedule(["a", "b"], 2000, random.Random(0))
    on_a = sum(a == "a" for a, _ in dealt)
    assert 900 < on_a < 1100  # a fair coin: 1000 ± 4.5 standard deviations
    assert schedule(["a", "b"], 50, random.Random(1)) != schedule(["a", "b"], 50, random.Random(2))


def test_prompts_are_dealt_evenly():
    dealt = deal_prompts(7, 30, random.Random(0))
    counts = Counter(dealt)
    assert sorted(counts) == list(range(7)) and max(counts.values()) - min(counts.values()) <= 1


def test_prompts_file_reads_text_messages_and_chat_records(tmp_path):
    prompts = read_prompts(prompts_file(tmp_path / "prompts.jsonl"))
    assert prompts == [
        [{"role": "user", "content": "alpha beta gamma"}],
        [{"role": "user", "content": "delta epsilon"}],
        [{"role": "user", "content": "zeta eta"}],
    ]
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(UserError) as error:
        read_prompts(tmp_path / "bad.jsonl")
    assert_one_line(error, "bad.jsonl:2", "role")


# ----------------------------------------------------------------------------- judges


def test_oracle_prefers_the_correct_answer(tiny_world):
    oracle = Oracle(tiny_world)
    prompts = [record["prompt"] for record in read_jsonl(tiny_world / "prefs" / "test.jsonl")[:6]]
    prompts = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
    right = [oracle.reference(p) for p in prompts]
    wrong = [oracle.corruptions(p, random.Random(0))["wrong"] for p in prompts]
    judge = load_judge("oracle", world=tiny_world)
    assert isinstance(judge, OracleJudge) and judge.name == "oracle"
    assert judge.judge(prompts, right, wrong) == ["model_a"] * 6
    assert judge.judge(prompts, wrong, right) == ["model_b"] * 6
    assert judge.judge(prompts, wrong, wrong) == ["tie (bothbad)"] * 6
    assert judge.judge(prompts, right, right) == ["tie"] * 6


class StubScorer:
    """A reward model whose reward is the number written in the answer."""

    def score(self, prompts, responses):
        return [float(r) for r in responses]


def test_reward_judge_ties_within_its_band():
    judge = RewardJudge(StubScorer(), "reward:stub", tie_band=0.5)
    prompts = [[{"role": "user", "content": "q"}]] * 6
    verdicts = judge.judge(
        prompts, ["1.0", "1.0", "1.0", "1.0", "2.0", "1.5"], ["0.4", "0.6", "1.4", "1.6", "2.0", "1.0"]
    )
    assert verdicts == ["model_a", "tie", "tie", "model_b", "tie", "model_a"]  # a tie is a margin under the band
    assert RewardJudge(StubScorer(), "r", tie_band=0.0).judge(prompts[:2], ["1.0", "1.0"], ["1.0", "0.9"]) == [
        "tie",
        "model_a",
    ]


def test_reward_judge_loads_a_reward_model_and_follows_its_scores(reward_model):
    prompts = [[{"role": "user", "content": c}] for c in ("alpha", "beta gamma", "delta", "zeta")]
    answers_a, answers_b = ["theta iota", "kappa", "mu mu", "alpha"], ["lambda", "eta eta eta", "mu", "alpha"]
    judge = load_judge(f"reward:{reward_model}", tie_band=0.0)
    assert judge.name == f"reward:{reward_model}" and judge.judge(prompts, answers_a, answers_b)[3] == "tie"
    rewards_a, rewards_b = judge.scorer.score(prompts, answers_a), judge.scorer.score(prompts, answers_b)
    expected = ["model_a" if a > b else "model_b" if b > a else "tie" for a, b in zip(rewards_a, rewards_b)]
    assert judge.judge(prompts, answers_a, answers_b) == expected and set(expected[:3]) <= {"model_a", "model_b"}
    band = max(abs(a - b) for a, b in zip(rewards_a, rewards_b)) * 1.01
    assert load_judge(f"reward:{reward_model}", tie_band=band).judge(prompts, answers_a, answers_b) == ["tie"] * 4


class StubBackend:
    """An LLM judge's model: ``prefer(context)`` says which label it finds likelier, "1" or "2"."""

    def __init__(self, prefer):
        self.prefer, self.requests = prefer, []

    def chat_context(self, messages):
        return "<chat>" + messages[0]["content"]

    def loglikelihood(self, requests):
        self.requests += requests
        return [(-1.0 if label.strip() == self.prefer(context) else -2.0, False) for context, label in requests]


def answer_with(word: str):
    """A judge that prefers the answer holding ``word``."""

    def prefer(context: str) -> str:
        first = context.split("Answer 1: ")[1].split("\n")[0]
        return "1" if word in first else "2"

    return prefer


def test_llm_judge_asks_both_orders_and_a_disagreement_is_a_tie():
    prompts = [[{"role": "user", "content": "q"}]] * 2
    sound = LlmJudge(StubBackend(answer_with("good")), "llm:stub")
    assert sound.judge(prompts, ["good", "bad"], ["bad", "good"]) == ["model_a", "model_b"]
    biased = LlmJudge(StubBackend(lambda context: "1"), "llm:stub")  # always the first answer: both orders disagree
    assert biased.judge(prompts, ["good", "bad"], ["bad", "good"]) == ["tie", "tie"]
    contexts = [context for context, _ in biased.backend.requests]
    assert contexts[0].startswith("<chat>") and "Answer 1: good\n\nAnswer 2: bad" in contexts[0]
    assert "Answer 1: bad\n\nAnswer 2: good" in contexts[2]  # the same battle, answers swapped


def test_llm_judge_without_a_chat_template_reads_plain_text_and_a_users_template():
    backend = StubBackend(answer_with("good"))
    judge = LlmJudge(backend, "llm:stub", template=USER_TEMPLATE, chat=False)
    assert judge.judge([[{"role": "user", "content": "why?"}]], ["bad"], ["good"]) == ["model_b"]
    assert backend.requests[0] == ("Q: why?\nAnswer 1: bad\nAnswer 2: good" + judges.PLAIN_CUE, " 1")
    with pytest.raises(UserError) as error:
        LlmJudge(backend, "llm:stub", template="{question} {answer_1}")
    assert_one_line(error, "{answer_2}")


def test_llm_judge_on_a_real_model_is_symmetric(tiny_model):
    """Both orders asked: swapping the answers mirrors the verdict, and an answer against itself is a tie."""
    judge = load_judge(f"llm:{tiny_model}")
    assert judge.chat  # tiny_model's tokenizer has gptlab's chat tokens
    prompts = [[{"role": "user", "content": c}] for c in ("alpha beta", "gamma", "delta epsilon")]
    answers_a, answers_b = ["zeta", "eta theta", "iota"], ["kappa lambda", "mu", "alpha alpha"]
    forward = judge.judge(prompts, answers_a, answers_b)
    mirror = {"model_a": "model_b", "model_b": "model_a", "tie": "tie"}
    assert [mirror[v] for v in judge.judge(prompts, answers_b, answers_a)] == forward
    assert judge.judge(prompts, answers_a, answers_a) == ["tie"] * 3


def test_judges_that_cannot_load_are_one_line(tmp_path, tiny_model, tiny_world):
    cases = [
        (("human",), ("gptlab serve --arena",)),
        (("elo",), ("unknown judge 'elo'", "reward:DIR")),
        (("reward",), ("unknown judge 'reward'",)),
        (("oracle",), ("--world",)),
        ((f"reward:{tmp_path / 'none'}",), ("does not exist",)),
        ((f"reward:{tiny_model}",), (str(tiny_model),)),  # a causal LM, not a reward model
        ((f"llm:{tmp_path / 'none'}",), ("does not exist",)),
        (("oracle", tiny_world, "cpu", "{question}{answer_1}{answer_2}"), ("--judge-template", "llm")),
    ]
    for args, fragments in cases:
        with pytest.raises(UserError) as error:
            load_judge(*args)
        assert_one_line(error, *fragments)


# ----------------------------------------------------------------------------- play and the command


def test_play_deals_every_pair_and_records_the_judges_verdicts(tiny_model, other_model, tmp_path):
    engines = {"a": Engine.from_pretrained(tiny_model), "b": Engine.from_pretrained(other_model)}
    engines["c"] = engines["a"]  # the same model under two names: their battles are ties
    prompts = read_prompts(prompts_file(tmp_path / "prompts.jsonl"))
    judge = RewardJudge(StubScorer(), "by length", tie_band=0.5)
    judge.scorer = type("Length", (), {"score": lambda self, p, r: [float(len(x)) for x in r]})()
    played = play(engines, prompts, judge, battles=10, seed=3, max_new_tokens=ANSWER_TOKENS)
    assert len(played) == 10 and {b.judge for b in played} == {"by length"}
    pairs = Counter(frozenset((b.model_a, b.model_b)) for b in played)
    assert sorted(pairs.values()) == [3, 3, 4]
    assert Counter(b.prompt[0]["content"] for b in played).most_common()[-1][1] >= 3  # each prompt 3 or 4 times
    for b in played:
        assert b.winner == ("tie" if abs(len(b.answer_a) - len(b.answer_b)) < 0.5 else b.winner)
        assert b.answer_a == chat_replies(engines[b.model_a], [b.prompt], ANSWER_TOKENS)[0]
        if {b.model_a, b.model_b} == {"a", "c"}:
            assert b.winner == "tie"
    assert [(b.model_a, b.model_b, b.prompt) for b in played] == [
        (b.model_a, b.model_b, b.prompt) for b in play(engines, prompts, judge, 10, seed=3, max_new_tokens=2)
    ]


def test_arena_run_end_to_end_writes_its_battles_to_the_database(tiny_model, other_model, tiny_world, tmp_path):
    db = tmp_path / "arena.db"
    args = ["arena", "run", "--models", f"first={tiny_model},second={other_model}", "--prompts"]
    args += [prompts_file(tmp_path / "prompts.jsonl"), "--judge", "oracle", "--world", tiny_world, "--battles", 7]
    result = gptlab(*args, "--db", db, "--max-new-tokens", ANSWER_TOKENS)
    assert result.returncode == 0, result.stderr[-3000:]
    with ArenaStore(db, create=False) as store:
        battles = store.battles()
    assert len(battles) == 7 and {b.judge for b in battles} == {"oracle"}
    assert {frozenset((b.model_a, b.model_b)) for b in battles} == {frozenset(("first", "second"))}
    assert all(b.winner in WINNERS and b.prompt for b in battles)
    assert "7 battles among 2 models, judged by oracle" in result.stdout and "(7 battles in all)" in result.stdout


def test_arena_run_bad_input_is_one_line_and_exit_2(capfd, tiny_model, other_model, reward_model, tmp_path):
    prompts, db = prompts_file(tmp_path / "prompts.jsonl"), tmp_path / "arena.db"
    two = f"a={tiny_model},b={other_model}"
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    cases = [
        (["--models", f"a={tiny_model}", "--prompts", prompts, "--judge", "oracle"], ("at least two models",)),
        (["--models", two, "--prompts", tmp_path / "empty.jsonl", "--judge", "oracle"], ("holds no prompts",)),
        (["--models", two, "--prompts", prompts, "--judge", "human"], ("gptlab serve --arena",)),
        (["--models", two, "--prompts", prompts, "--judge", "judy"], ("unknown judge 'judy'",)),
        (["--models", two, "--prompts", prompts, "--judge", f"reward:{tiny_model}"], (str(tiny_model),)),
        (["--models", two, "--prompts", prompts, "--judge", f"reward:{tmp_path / 'no'}"], ("does not exist",)),
        (["--models", two, "--prompts", prompts, "--judge", "oracle", "--battles", "0"], ("--battles",)),
        (
            ["--models", f"a={tiny_model},r={reward_model}", "--prompts", prompts, "--judge", f"reward:{reward_model}"],
            ("reward model", "causal LM"),
        ),
    ]
    for args, fragments in cases:
        assert_user_error(gptlab_in_process(capfd, "arena", "run", *args, "--db", db), *fragments)
    assert not db.exists()  # nothing was played, so no database was made


# ----------------------------------------------------------------------------- board, import, export


@pytest.fixture
def arena_db(tmp_path) -> Path:
    """Three models: strong beats the others most of the time, weak loses most."""
    rng = random.Random(0)
    strength = {"strong": 2.0, "middle": 1.0, "weak": 0.0}
    battles = []
    for i in range(150):
        a, b = rng.sample(sorted(strength), 2)
        p_a = 1 / (1 + 10 ** (strength[b] - strength[a]))
        draw = rng.random()
        winner = "model_a" if draw < p_a - 0.05 else "model_b" if draw > p_a + 0.05 else "tie"
        battles.append(battle(a, b, winner, tstamp=1000.0 + i))
    db = tmp_path / "arena.db"
    with ArenaStore(db) as store:
        store.add_many(battles)
    return db


def test_arena_board_in_four_formats(capfd, arena_db, tmp_path):
    result = gptlab_in_process(capfd, "arena", "board", "--db", arena_db, "--bootstrap", 20)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "| " + " | ".join(COLUMNS) + " |" in lines
    header = lines.index("| " + " | ".join(COLUMNS) + " |")
    rows = [dict(zip(COLUMNS, line.strip("| ").split(" | "))) for line in lines[header + 2 : header + 5]]
    assert [row["model"] for row in rows] == ["strong", "middle", "weak"] and rows[0]["rank_ub"] == "1"
    assert float(rows[0]["bt"]) > 1000 > float(rows[2]["bt"])
    assert "| | strong | middle | weak |" in lines  # the win-rate matrix, in board order

    out = tmp_path / "board.json"
    assert gptlab_in_process(capfd, "arena", "board", "--db", arena_db, "--out", out, "--bootstrap", 20).returncode == 0
    board = json.loads(out.read_text())
    assert [list(row) for row in board["leaderboard"]] == [list(COLUMNS)] * 3 and board["battles"] == 150
    assert [row["model"] for row in board["leaderboard"]] == ["strong", "middle", "weak"]
    assert (
        board["win_matrix"]["models"] == ["strong", "middle", "weak"] and board["win_matrix"]["win_rate"][0][0] is None
    )
    for row in board["leaderboard"]:
        assert row["ci_low"] <= row["bt"] <= row["ci_high"]

    printed = gptlab_in_process(capfd, "arena", "board", "--db", arena_db, "--format", "json", "--bootstrap", 20).stdout
    assert json.loads(printed) == board and printed.endswith("}\n")  # printed as written, the prompt on a new line

    result = gptlab_in_process(capfd, "arena", "board", "--db", arena_db, "--format", "csv", "--bootstrap", 20)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == list(COLUMNS) and [r["model"] for r in rows] == ["strong", "middle", "weak"]
    assert sum(int(r["battles"]) for r in rows) == 300

    png = tmp_path / "plots" / "board.png"
    result = gptlab_in_process(capfd, "arena", "board", "--db", arena_db, "--out", png, "--bootstrap", 20)
    assert result.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arena_board_bad_input_is_one_line(capfd, arena_db, tmp_path):
    assert_user_error(gptlab_in_process(capfd, "arena", "board", "--db", tmp_path / "none.db"), "none.db")
    assert_user_error(gptlab_in_process(capfd, "arena", "board", "--db", arena_db, "--format", "png"), "--out")
    with ArenaStore(tmp_path / "empty.db"):
        pass
    assert_user_error(gptlab_in_process(capfd, "arena", "board", "--db", tmp_path / "empty.db"), "no battles")


def test_arena_import_and_export_through_the_command(capfd, arena_db, tmp_path):
    exported = tmp_path / "out" / "battles.json"
    result = gptlab_in_process(capfd, "arena", "export", "--fastchat", exported, "--db", arena_db)
    assert result.returncode == 0 and "exported 150 battles" in result.stdout, result.stderr
    rows = json.loads(exported.read_text())
    assert len(rows) == 150 and rows[0]["model_a"] and rows[0]["winner"] in WINNERS
    copy = tmp_path / "copy.db"
    result = gptlab_in_process(capfd, "arena", "import", "--fastchat", exported, "--db", copy)
    assert result.returncode == 0 and "imported 150 new of 150" in result.stdout, result.stderr
    again = gptlab_in_process(capfd, "arena", "import", "--fastchat", exported, "--db", copy)
    assert "imported 0 new of 150" in again.stdout and "(150 battles in all)" in again.stdout
    with ArenaStore(arena_db) as original, ArenaStore(copy) as imported:
        fields = [[(b.model_a, b.model_b, b.winner, b.tstamp) for b in s.battles()] for s in (original, imported)]
    assert fields[0] == fields[1]

    rows[3]["winner"] = "model_c"
    (tmp_path / "bad.json").write_text(json.dumps(rows), encoding="utf-8")
    fresh = tmp_path / "fresh.db"
    result = gptlab_in_process(capfd, "arena", "import", "--fastchat", tmp_path / "bad.json", "--db", fresh)
    assert_user_error(result, "index 3", "model_c")
    assert not fresh.exists()
