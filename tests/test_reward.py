"""The reward model: the head reads the last real token, transformers reads the same folder to the same
scores, the loss is TRL's (closed forms), it learns TinyWorld's preferences, it resumes exactly, and a
reward model and a causal LM are never taken for each other."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.align.reward import (
    RewardConfig,
    RewardScorer,
    RewardTrainConfig,
    load_config,
    load_init,
    pair_terms,
    reward,
    reward_loss,
)
from gptlab.data.prefs import PrefDataConfig, load_pref_data
from gptlab.errors import UserError
from gptlab.logprobs import padded_inputs
from gptlab.model import GPT, ModelConfig, RewardModel
from gptlab.report import write_reports
from gptlab.tokenizer import CHAT_TEMPLATE, Tokenizer
from helpers import (
    ONE_THREAD,
    ROOT,
    TORCHRUN_TWO_RANKS,
    assert_one_line,
    assert_user_error,
    gptlab,
    gptlab_in_process,
    run_python,
    snapshot,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("on_one_thread")  # conftest: tiny models run fastest on one thread

FAMILIES = {  # two layers each; llama with grouped-query attention, so the K/V split is checked too
    "llama": dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32),
    "gpt2": dict(family="gpt2", n_layer=2, n_head=2, n_embd=32),
}
BLOCK = 128
# Pairs where the only difference is the final period, TinyWorld's `no_period` kind.
PERIOD_PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"Reverse {w}."}],
        "chosen": [{"role": "assistant", "content": f"The answer is {w[::-1]}."}],
        "rejected": [{"role": "assistant", "content": f"The answer is {w[::-1]}"}],
    }
    for w in ("plomet", "sholgai", "traba", "emum", "uzlits", "holgais")
]


@pytest.fixture(scope="module")
def tok(quick_world: Path) -> Tokenizer:
    records = [json.loads(line) for line in (quick_world / "prefs" / "train.jsonl").read_text().splitlines()]
    return Tokenizer.train([m["content"] for r in records for k in ("prompt", "chosen", "rejected") for m in r[k]], 300)


@pytest.fixture(scope="module")
def base(tok: Tokenizer, tmp_path_factory) -> Path:
    """A randomly initialised causal LM folder with the tokenizer: the `init` of a reward run."""
    folder = tmp_path_factory.mktemp("base") / "model"
    torch.manual_seed(0)
    GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=BLOCK, **FAMILIES["llama"])).save_pretrained(folder, tok)
    return folder


def random_reward_model(tok: Tokenizer, family: str) -> RewardModel:
    """Rewards of order one (the head's usual 0.02 would make any two models agree to 1e-4)."""
    torch.manual_seed(1)
    model = RewardModel(ModelConfig(vocab_size=tok.vocab_size, block_size=BLOCK, **FAMILIES[family])).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model


def padded(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


def rows_of(tok: Tokenizer) -> list[list[int]]:
    """Three rendered pairs of different lengths, one ending in the pad id as a real token."""
    scorer_rows = [
        RewardScorer(random_reward_model(tok, "llama"), tok).render(r["prompt"], r["chosen"]) for r in PERIOD_PAIRS[:2]
    ]
    return [*scorer_rows, tok.encode("alpha beta") + [tok.pad_id]]


# ----------------------------------------------------------------------------- the head


@pytest.mark.parametrize("family", FAMILIES)
def test_the_head_reads_the_last_real_token_padded_on_either_side(tok: Tokenizer, family: str):
    model = random_reward_model(tok, family)
    rows = rows_of(tok)
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long)) for row in rows])
        assert alone.std() > 0.1
        for left in (False, True):
            for pad_id in (tok.pad_id, 5):  # the padding's id does not matter: the mask decides
                assert torch.allclose(model(*padded(rows, pad_id, left)), alone, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- Hugging Face folders


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_the_folder_to_the_same_scores_and_back(tok: Tokenizer, family: str, tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    model = random_reward_model(tok, family)
    model.save_pretrained(tmp_path / "rm", tokenizer=tok)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["pad_token_id"] == tok.pad_id and config["id2label"] == {"0": "LABEL_0"}
    assert not (tmp_path / "rm" / "generation_config.json").exists()
    assert (tmp_path / "rm" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    expected = {"llama": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}[family]
    assert type(hf).__name__ == expected and hf.config.num_labels == 1
    rows = rows_of(tok)[:2]  # transformers reads the last token that is not the pad id: no pad id in the text
    with torch.no_grad():
        ours = model(*padded(rows, tok.pad_id, left=False))
        ids, mask = padded(rows, tok.pad_id, left=False)
        right = hf(ids, attention_mask=mask).logits.squeeze(-1)
        ids, mask = padded(rows, tok.pad_id, left=True)
        left = hf(ids, attention_mask=mask, position_ids=padded_inputs(mask)[0]).logits.squeeze(-1)
        assert (ours - right).abs().max() < 1e-4 and (ours - left).abs().max() < 1e-4, (ours, right, left)
        assert torch.equal(RewardModel.from_pretrained(tmp_path / "rm")(ids, mask), model(ids, mask))
        hf.save_pretrained(tmp_path / "from_hf")  # transformers' own folder loads in gptlab too
        assert torch.allclose(RewardModel.from_pretrained(tmp_path / "from_hf")(ids, mask), ours, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the loss


def test_the_loss_is_trls_with_its_closed_form_gradient():
    equal = torch.tensor([0.3, -1.2, 0.3, -1.2])  # chosen, chosen, rejected, rejected
    loss, metrics = reward_loss(
        lambda ids, mask: equal, {"input_ids": None, "attention_mask": None, "margin": torch.zeros(2)}
    )
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["accuracy"].item() == 0 and metrics["margin"].item() == 0
    assert metrics["mean_reward"].item() == pytest.approx(-0.45)
    rewards = torch.tensor([1.0, -0.5, 2.0, 0.25, 0.5, -1.0], requires_grad=True)
    margin, coefficient = torch.tensor([0.0, 1.0, 0.5]), 0.01
    chosen, rejected = rewards.detach().chunk(2)
    loss = pair_terms(rewards, margin, coefficient)["loss"].mean()
    z = chosen - rejected - margin
    expected = (-torch.nn.functional.logsigmoid(z)).mean() + coefficient * ((chosen + rejected) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    # d/dr_c = -σ(-z)/B + 2c(r_c + r_r)/B and d/dr_r = +σ(-z)/B + 2c(r_c + r_r)/B
    pull, centre = torch.sigmoid(-z) / 3, 2 * coefficient * (chosen + rejected) / 3
    assert torch.allclose(rewards.grad, torch.cat([-pull + centre, pull + centre]), atol=1e-7)


# ----------------------------------------------------------------------------- training


def reward_config(base: Path, train: Path, val: Path | None = None, **train_settings) -> RewardConfig:
    settings = dict(
        max_steps=150, batch_size=16, lr=1e-3, warmup_steps=10, seq_len=BLOCK, eval_every=50, log_every=10, device="cpu"
    )
    data = PrefDataConfig(train=str(train), val=str(val) if val else None)
    return RewardConfig(init=str(base), data=data, train=RewardTrainConfig(**{**settings, **train_settings}))


def test_it_learns_tinyworlds_preferences_and_the_scorer_agrees(
    base: Path, tok: Tokenizer, quick_world: Path, tmp_path: Path
):
    """150 steps of 16 pairs (about 2.5 epochs of the quick world's 920 pairs that fit 128 tokens) take a
    two-layer model from the loss of a coin (ln 2) to about 0.55 on the 155 held-out pairs. It learns
    what the text shows: the rejected answer lacks the final period, rambles, repeats itself or opens
    with filler (measured 96-100% on each of those kinds); a wrong number or word needs knowledge it
    lacks (about chance), and "correct_first" pairs, whose correct chosen answer lacks the period,
    it gets mostly wrong. Overall about 77%."""
    prefs = quick_world / "prefs"
    reward(reward_config(base, prefs / "train.jsonl", prefs / "test.jsonl"), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evaluated] == [50, 100, 150]
    assert evaluated[-1]["eval_accuracy"] >= 0.7 and evaluated[-1]["eval_loss"] < 0.62, evaluated
    assert {"accuracy", "margin", "mean_reward"} <= records[-1].keys()

    # The exported folder scores the held-out pairs as the evaluation did, through the public scorer.
    scorer = RewardScorer.from_pretrained(tmp_path / "run" / "model")
    kept, _ = load_pref_data(prefs / "test.jsonl", tok, BLOCK)
    records = [json.loads(line) for line in (prefs / "test.jsonl").read_text().splitlines()]
    pairs = [records[p.index] for p in kept]
    chosen = scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], batch_size=7)
    rejected = scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    right = [c > r for c, r in zip(chosen, rejected)]
    assert sum(right) / len(pairs) == pytest.approx(evaluated[-1]["eval_accuracy"], abs=1.5 / len(pairs))
    for kind in ("no_period", "ramble", "repeat", "filler"):
        of_kind = [ok for ok, p in zip(right, pairs) if p["kind"] == kind]
        assert len(of_kind) >= 15 and sum(of_kind) / len(of_kind) >= 0.9, (kind, of_kind)

    (report,) = write_reports(tmp_path / "run")
    assert "held-out pairs: accuracy, last / best" in report.read_text()


def test_string_pairs_score_as_the_standard_format_renders_them(base: Path, tok: Tokenizer, tmp_path: Path):
    model = RewardModel.from_causal_lm(base)
    scorer = RewardScorer(model, tok)
    ids = scorer.render("alpha beta", " gamma")
    assert ids == [
        tok.bos_id,
        *tok.encode("alpha beta", add_special_tokens=False),
        *tok.encode(" gamma", add_special_tokens=False),
        tok.eos_id,
    ]
    prompts, answers = [r["prompt"] for r in PERIOD_PAIRS], [r["chosen"] for r in PERIOD_PAIRS]
    assert scorer.score(prompts, answers, batch_size=1) == pytest.approx(scorer.score(prompts, answers), abs=1e-6)
    long_prompt = "alpha " * 200  # cut from its left, as training cuts it
    assert len(scorer.render(long_prompt, " gamma")) == BLOCK
    with pytest.raises(UserError) as e:
        scorer.render("alpha", " gamma" * 200)
    assert_one_line(e, "block_size 128")


def test_exact_resume(base: Path, tmp_path: Path):
    """Stopped at step 6 and resumed to 12 == 12 straight (constant learning rate after warmup)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PERIOD_PAIRS)
    settings = dict(
        max_steps=12, batch_size=4, schedule="linear", warmdown_fraction=0.0, warmup_steps=2, eval_every=3, log_every=1
    )
    reward(reward_config(base, data, data, **settings), tmp_path / "straight")
    reward(reward_config(base, data, data, **{**settings, "max_steps": 6}), tmp_path / "resumed")
    reward(reward_config(base, data, data, **settings), tmp_path / "resumed", resume=True)
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    for name in ("loss", "accuracy", "eval_loss", "eval_accuracy"):
        logged = [
            [r.get(name) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
            for run in ("straight", "resumed")
        ]
        assert logged[0] == logged[1] and len(logged[0]) == 12, name


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(base: Path, quick_world: Path, tmp_path: Path, parallelism: str):
    prefs = quick_world / "prefs"
    sets = [
        f"init={base}",
        f"data.train={prefs / 'train.jsonl'}",
        f"data.val={prefs / 'test.jsonl'}",
        "train.max_steps=6",
        "train.batch_size=8",
        "train.lr=1e-3",
        "train.eval_every=3",
        "train.log_every=1",
        "train.eval_batches=4",
        "train.device=cpu",
    ]
    reward(load_config(None, sets, tmp_path / "one", resume=False), tmp_path / "one")
    args = [a for s in [*sets, f"train.parallelism={parallelism}"] for a in ("--set", s)]
    result = run_python(*TORCHRUN_TWO_RANKS, "-m", "gptlab", "reward", "--out", tmp_path / "two", *args, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    logged = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    for name in ("loss", "accuracy", "margin", "grad_norm", "eval_loss", "eval_accuracy"):
        one, two = ([r.get(name) for r in records] for records in logged)
        assert one == pytest.approx(two, abs=1e-4), name
    one, two = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)


# ----------------------------------------------------------------------------- config and mistakes


def test_config_defaults_and_the_example_config(base: Path, tmp_path: Path):
    cfg = load_config(None, [f"init={base}"], tmp_path, resume=False)
    assert cfg.train.seq_len == BLOCK and cfg.train.lr == 1e-4 and cfg.center_rewards_coefficient is None
    example = load_config(str(ROOT / "configs" / "reward.toml"), ["train.seq_len=64"], tmp_path, resume=False)
    assert example.init == "runs/sft/model" and example.data.val == "data/world/prefs/test.jsonl"
    assert (
        load_config(None, ["center_rewards_coefficient=0.01"], tmp_path, resume=False).center_rewards_coefficient
        == 0.01
    )


def test_a_reward_model_and_a_causal_lm_are_never_taken_for_each_other(
    capfd, base: Path, tok: Tokenizer, tmp_path: Path
):
    folder = tmp_path / "rm"
    random_reward_model(tok, "llama").save_pretrained(folder, tokenizer=tok)
    before = snapshot(tmp_path)
    assert_user_error(
        gptlab_in_process(capfd, "sft", "--out", tmp_path / "sft", "--set", f"init={folder}"), "holds a reward model"
    )
    assert_user_error(gptlab("chat", "--model", folder, stdin="hello\n"), "LlamaForSequenceClassification")
    with pytest.raises(UserError) as e:
        RewardScorer.from_pretrained(base)
    assert_one_line(e, "holds a causal language model (LlamaForCausalLM), not a reward model")
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(folder)
    assert_one_line(e, "holds a reward model")
    assert snapshot(tmp_path) == before and not (tmp_path / "sft").exists()


def test_bad_input_is_one_clear_line_and_writes_nothing(capfd, base: Path, tok: Tokenizer, tmp_path: Path):
    bad = write_jsonl(tmp_path / "pairs.jsonl", [PERIOD_PAIRS[0], {"prompt": "alpha", "chosen": "beta"}])
    assert_user_error(
        gptlab_in_process(
            capfd,
            "reward",
            "--out",
            tmp_path / "r",
            "--set",
            f"init={base}",
            "--set",
            f"data.train={bad}",
            "--set",
            "train.device=cpu",
        ),
        "pairs.jsonl:2",
        "'rejected'",
    )
    assert_user_error(
        gptlab_in_process(capfd, "reward", "--out", tmp_path / "r", "--set", "center_reward_coefficient=0.1"),
        "did you mean 'center_rewards_coefficient'",
    )

    def error(init: Path, *overrides: str) -> str:
        with pytest.raises(UserError) as e:
            reward(
                load_config(None, [f"init={init}", f"data.train={bad}", *overrides], tmp_path / "r", False),
                tmp_path / "r",
            )
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "block_size 128" in error(base, "train.seq_len=500")
    no_pad = tmp_path / "no_pad"
    GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16)).save_pretrained(
        no_pad, tok
    )
    config = json.loads((no_pad / "tokenizer_config.json").read_text())
    (no_pad / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": None}))
    assert "no pad token" in error(no_pad)
    two_labels = tmp_path / "two_labels"
    random_reward_model(tok, "llama").save_pretrained(two_labels, tokenizer=tok)
    config = json.loads((two_labels / "config.json").read_text())
    (two_labels / "config.json").write_text(json.dumps({**config, "id2label": {"0": "bad", "1": "good"}}))
    assert "2 labels" in error(two_labels)
    assert not (tmp_path / "r").exists()  # nothing was written before the mistake was found


def test_the_reward_stage_starts_without_dropout(tmp_path: Path, tok: Tokenizer):
    folder = tmp_path / "dropout"
    GPT(
        ModelConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16, dropout=0.3)
    ).save_pretrained(folder, tokenizer=tok)
    model = load_init(folder).train()
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids, mask = torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long)
    assert torch.equal(model(ids, mask), model(ids, mask))
