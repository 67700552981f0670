"""DPO: TRL's losses in closed form, log-probs of the answers only and independent of padding, the
reference (precomputed == live, never updated), learning, exact resume, the report and bad input."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gptlab.align.dpo as dpo_module
from gptlab.align.dpo import (
    DpoConfig,
    DpoTrainConfig,
    FrozenReference,
    completion_logps,
    dpo,
    dpo_losses,
    dpo_objective,
    reference_table,
)
from gptlab.data.prefs import PrefDataConfig, collate_pairs, encode_pair
from gptlab.errors import UserError
from gptlab.model import GPT, ModelConfig
from gptlab.runs import RunFolder
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import Runtime
from helpers import (
    ONE_THREAD,
    TORCHRUN_TWO_RANKS,
    WORDS,
    assert_one_line,
    assert_user_error,
    gptlab,
    gptlab_in_process,
    run_python,
    snapshot,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("on_one_thread")  # conftest: tiny models run fastest on one thread


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------- the losses

POLICY_EQUALS_REFERENCE = {  # loss_type: (label_smoothing, the loss when the policy is the reference)
    "sigmoid": (0.0, math.log(2)),
    "robust": (0.2, math.log(2)),  # ((1-ε) ln 2 - ε ln 2) / (1-2ε)
    "hinge": (0.0, 1.0),
    "ipo": (0.0, (1 / (2 * 0.1)) ** 2),
}


@pytest.mark.parametrize("loss_type", list(POLICY_EQUALS_REFERENCE))
def test_at_the_start_the_losses_take_their_closed_form(loss_type: str):
    """The policy is the reference: every pair's logits are 0, so sigmoid gives exactly ln 2."""
    smoothing, expected = POLICY_EQUALS_REFERENCE[loss_type]
    logps = torch.tensor([[-12.5, -7.25], [-3.0, -40.0]], dtype=torch.float64)
    losses = dpo_losses(logps[:, 0], logps[:, 1], logps[:, 0], logps[:, 1], 0.1, loss_type, smoothing)
    assert losses.tolist() == [expected, expected]


def test_the_losses_equal_hand_computed_values():
    """logits = (-3 - -5) - (-4 - -4.5) = 1.5; with β = 0.1, β·logits = 0.15."""
    args = [torch.tensor([x], dtype=torch.float64) for x in (-3.0, -5.0, -4.0, -4.5)]
    eps = 0.2

    def loss(loss_type, smoothing=0.0):
        return dpo_losses(*args, beta=0.1, loss_type=loss_type, label_smoothing=smoothing).item()

    assert loss("sigmoid") == pytest.approx(-log_sigmoid(0.15), abs=1e-15)
    assert loss("sigmoid", eps) == pytest.approx(-(1 - eps) * log_sigmoid(0.15) - eps * log_sigmoid(-0.15), abs=1e-15)
    robust = (-(1 - eps) * log_sigmoid(0.15) + eps * log_sigmoid(-0.15)) / (1 - 2 * eps)
    assert loss("robust", eps) == pytest.approx(robust, abs=1e-15)
    assert loss("hinge") == pytest.approx(0.85, abs=1e-15)
    assert loss("ipo") == pytest.approx((1.5 - 5.0) ** 2, abs=1e-12)
    far = [torch.tensor([x], dtype=torch.float64) for x in (0.0, -20.0, 0.0, 0.0)]  # β·logits = 2: past the hinge
    assert dpo_losses(*far, beta=0.1, loss_type="hinge").item() == 0.0


@pytest.mark.parametrize(
    "loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)]
)
def test_the_gradient_matches_finite_differences(loss_type: str, smoothing: float):
    torch.manual_seed(0)
    policy = (torch.randn(2, 6, dtype=torch.float64) * 3).requires_grad_()
    reference = torch.randn(2, 6, dtype=torch.float64) * 3

    def mean_loss(p):
        return dpo_losses(p[0], p[1], reference[0], reference[1], 0.5, loss_type, smoothing).mean()

    assert torch.autograd.gradcheck(mean_loss, (policy,), eps=1e-6, atol=1e-8)


def test_ipo_compares_per_token_log_probs_and_the_metrics_follow_trl():
    """TRL's IPO divides each answer's log-prob (policy and reference) by its token count; the
    rewards β(log π - log π_ref) use the summed log-probs for every loss type."""
    scores = {
        "policy": torch.tensor([[-6.0, -12.0], [-2.0, -1.0]]),
        "reference": torch.tensor([[-8.0, -9.0], [-2.0, -2.0]]),
        "tokens": torch.tensor([[2, 3], [1, 4]]),
        "logits": torch.tensor([[4.0, 6.0], [1.0, -2.0]]),
    }
    cfg = DpoConfig(beta=0.5, loss_type="ipo")
    loss, metrics = dpo_objective(cfg, scores)
    first = (-6 / 2 - -12 / 3) - (-8 / 2 - -9 / 3)
    second = (-2 / 1 - -1 / 4) - (-2 / 1 - -2 / 4)
    assert loss.item() == pytest.approx(((first - 1) ** 2 + (second - 1) ** 2) / 2, abs=1e-6)
    chosen, rejected = [0.5 * 2.0, 0.5 * 0.0], [0.5 * -3.0, 0.5 * 1.0]
    expected = {
        "rewards/chosen": sum(chosen) / 2,
        "rewards/rejected": sum(rejected) / 2,
        "rewards/accuracies": 0.5,
        "rewards/margins": (chosen[0] - rejected[0] + chosen[1] - rejected[1]) / 2,
        "logps/chosen": -4.0,
        "logps/rejected": -6.5,
        "logits/chosen": 5 / 3,
        "logits/rejected": 4 / 7,
    }
    assert {name: pytest.approx(value, abs=1e-6) for name, value in expected.items()} == {
        name: value.item() for name, value in metrics.items()
    }


def test_rpo_alpha_adds_the_chosen_answers_nll_per_token():
    """RPO (TRL's rpo_alpha): the DPO loss plus α times the chosen answers' negative log-likelihood
    per answer token; at the start (policy = reference) that is ln 2 + α·NLL exactly."""
    scores = {
        "policy": torch.tensor([[-6.0, -12.0], [-3.0, -1.0]], dtype=torch.float64),
        "reference": torch.tensor([[-6.0, -12.0], [-3.0, -1.0]], dtype=torch.float64),
        "tokens": torch.tensor([[2, 3], [1, 4]]),
        "logits": torch.zeros(2, 2),
    }
    loss, metrics = dpo_objective(DpoConfig(rpo_alpha=0.5), scores)
    nll = (6.0 + 3.0) / (2 + 1)
    assert metrics["nll_loss"].item() == pytest.approx(nll, abs=1e-12)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * nll, abs=1e-12)
    assert "nll_loss" not in dpo_objective(DpoConfig(), scores)[1]
    with pytest.raises(ValueError, match="rpo_alpha must be a finite number >= 0"):
        DpoConfig(rpo_alpha=-1.0)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, ipo, hinge, robust"):
        DpoConfig(loss_type="kto")
    with pytest.raises(ValueError, match="applies to the sigmoid and robust losses"):
        DpoConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        DpoConfig(loss_type="robust", label_smoothing=0.5)


# ----------------------------------------------------------------------------- log-probs


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> GPT:
    return GPT.from_pretrained(tiny_model)


def word_pair(rng: random.Random) -> dict:
    """A conversational pair: the chosen answer reverses the question's words and ends with a period."""
    words = rng.sample(WORDS, rng.randint(2, 5))
    return {
        "prompt": [{"role": "user", "content": " ".join(words)}],
        "chosen": [{"role": "assistant", "content": " ".join(reversed(words)) + "."}],
        "rejected": [{"role": "assistant", "content": " ".join(words)}],
    }


def word_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [word_pair(rng) for _ in range(n)]


def left_padded(batch: dict, pad_id: int) -> dict:
    """The same rows with their padding moved to the left."""
    moved = {key: value.clone() for key, value in batch.items()}
    for row, length in enumerate(batch["attention_mask"].sum(-1).tolist()):
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("completion_mask", 0)):
            moved[key][row] = torch.roll(batch[key][row], batch[key].size(1) - length)
            moved[key][row, : batch[key].size(1) - length] = fill
    return moved


def test_a_pairs_log_probs_depend_neither_on_padding_nor_on_the_other_rows(tok: Tokenizer, model: GPT):
    rng = random.Random(1)
    pairs = [encode_pair(tok, word_pair(rng), i) for i in range(5)]
    pairs[0] = encode_pair(tok, {"prompt": "alpha", "chosen": " beta", "rejected": " gamma delta"}, 0)  # the shortest
    with torch.no_grad():
        alone = completion_logps(model, collate_pairs(pairs[:1], tok.pad_id))[0]
        batch = collate_pairs(pairs, tok.pad_id)
        right = completion_logps(model, batch)[0]
        left = completion_logps(model, left_padded(batch, tok.pad_id))[0]
    rows = [0, len(pairs)]  # the first pair's chosen and rejected answers
    assert batch["attention_mask"][rows].sum() < batch["attention_mask"][rows].numel()  # it is padded
    torch.testing.assert_close(right[rows], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, right, rtol=0, atol=1e-5)
    others = collate_pairs(pairs[:1] + pairs[3:], tok.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(model, others)[0][[0, 3]], alone, rtol=0, atol=1e-5)


def test_only_the_answer_tokens_are_scored(tok: Tokenizer):
    """With logits that ignore the input, the log-prob moves exactly when a scored target moves:
    never for a prompt token, always for an answer token (the first one included)."""
    pair = encode_pair(tok, word_pair(random.Random(2)), 0)
    batch = collate_pairs([pair], tok.pad_id)
    fixed = torch.randn(1, batch["input_ids"].size(1), tok.vocab_size, generator=torch.Generator().manual_seed(0))

    def stub(idx, position_ids=None, attn_mask=None):
        return fixed.expand(idx.size(0), -1, -1)

    def chosen_logp(ids):
        return completion_logps(stub, {**batch, "input_ids": ids})[0][0].item()

    start, end = len(pair.prompt), len(pair.prompt) + len(pair.chosen)
    base = chosen_logp(batch["input_ids"])
    by_hand = fixed[0, start - 1 : end - 1].log_softmax(-1).gather(-1, batch["input_ids"][0, start:end, None]).sum()
    assert base == pytest.approx(by_hand.item(), abs=1e-5)
    assert completion_logps(stub, batch)[1].tolist() == [len(pair.chosen), len(pair.rejected)]
    for position in range(end):
        changed = batch["input_ids"].clone()
        changed[0, position] = (changed[0, position] + 1) % tok.vocab_size
        assert (chosen_logp(changed) != base) == (position >= start), position


# ----------------------------------------------------------------------------- the reference


def test_precomputed_reference_log_probs_equal_a_live_frozen_reference(tok: Tokenizer, tiny_model: Path):
    pairs = [encode_pair(tok, record, i) for i, record in enumerate(word_pairs(7, seed=3))]
    pairs = pairs[:2] + pairs[3:]  # a record that was dropped leaves a gap in the indices
    runtime = Runtime(torch.device("cpu"), None)
    table = reference_table(GPT.from_pretrained(tiny_model), pairs, 3, tok.pad_id, runtime)
    assert table.shape == (7, 2) and table[2].isnan().all() and not table[[0, 1, 3, 4, 5, 6]].isnan().any()
    live = FrozenReference(GPT.from_pretrained(tiny_model))
    batch = collate_pairs(pairs[1:5], tok.pad_id)  # another batching than the precomputation's
    torch.testing.assert_close(live(batch, "train"), table[batch["index"]], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- training


def write_pairs(folder: Path) -> tuple[Path, Path]:
    return (
        write_jsonl(folder / "train.jsonl", word_pairs(48, seed=10)),
        write_jsonl(folder / "test.jsonl", word_pairs(16, seed=11)),
    )


def dpo_config(init: Path, train: Path, val: Path, **settings) -> DpoConfig:
    top = {key: settings.pop(key) for key in ("ref", "precompute_ref", "loss_type", "beta") if key in settings}
    train_settings = dict(
        max_steps=40,
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup_steps=4,
        eval_every=20,
        eval_batches=2,
        log_every=5,
        save_every=0,
        seed=0,
        device="cpu",
    )
    train_settings.update(settings)
    return DpoConfig(
        init=str(init),
        data=PrefDataConfig(train=str(train), val=str(val)),
        train=DpoTrainConfig(**train_settings),
        **top,
    )


def metrics_of(run: Path) -> list[dict]:
    return RunFolder(run).read_metrics()


def learning_metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the speed and memory figures, which vary from run to run."""
    return [{k: v for k, v in r.items() if k not in ("tok_per_s", "mfu", "peak_mem_mb")} for r in metrics_of(run)]


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory) -> Path:
    """A DPO run through the CLI, the reference's log-probs precomputed (the default)."""
    root = tmp_path_factory.mktemp("dpo")
    train, val = write_pairs(root)
    sets = [
        f"init={tiny_model}",
        f"data.train={train}",
        f"data.val={val}",
        "train.max_steps=40",
        "train.batch_size=8",
        "train.seq_len=64",
        "train.lr=3e-3",
        "train.warmup_steps=4",
        "train.eval_every=20",
        "train.log_every=5",
        "train.device=cpu",
    ]
    result = gptlab("dpo", "--out", root / "run", *[a for s in sets for a in ("--set", s)], env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def test_dpo_widens_the_margins_and_raises_the_accuracies(trained: Path):
    records = metrics_of(trained)
    logged = [r for r in records if "rewards/margins" in r]
    evals = [r for r in records if "eval_rewards/margins" in r]
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"] + 1.0, logged
    assert logged[-1]["rewards/accuracies"] > logged[0]["rewards/accuracies"]
    assert logged[-1]["rewards/accuracies"] >= 0.9
    assert len(evals) == 2 and evals[-1]["eval_rewards/accuracies"] >= 0.9 and evals[-1]["eval_rewards/margins"] > 1.0
    assert evals[-1]["eval_loss"] < 0.4 and logged[-1]["loss"] < 0.4
    expected = {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    }
    assert expected <= logged[-1].keys() and {f"eval_{name}" for name in expected} | {"eval_loss"} <= evals[-1].keys()
    run = json.loads((trained / "run.json").read_text())
    assert run["kind"] == "dpo" and run["data"]["train"]["kept"] == 48
    assert set(load_file(trained / "ref_logps.safetensors")) == {"train", "val"}


def test_the_model_folder_opens_in_transformers_chat_and_the_report(trained: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = trained / "model"
    hf_tok = AutoTokenizer.from_pretrained(model)
    ids = hf_tok.apply_chat_template(
        [{"role": "user", "content": "alpha beta"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    theirs, ours = AutoModelForCausalLM.from_pretrained(model), GPT.from_pretrained(model)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-4)
    result = gptlab(
        "chat", "--model", model, "--temperature", "0", "--max-new-tokens", "8", stdin="gamma delta\n", env=ONE_THREAD
    )
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    result = gptlab("report", trained)
    assert result.returncode == 0, result.stderr
    report = (trained / "report.md").read_text()
    assert "rewards/accuracies" in report and "eval_rewards/margins" in report and "(rewards.png)" in report


def test_a_live_reference_never_changes_and_gives_the_precomputed_run(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    train, val = write_pairs(tmp_path)
    references = []

    class Recorded(FrozenReference):
        def __init__(self, model):
            super().__init__(model)
            references.append(self)

    monkeypatch.setattr(dpo_module, "FrozenReference", Recorded)
    dpo(dpo_config(tiny_model, train, val, max_steps=8, log_every=1, precompute_ref=False), tmp_path / "live")
    dpo(dpo_config(tiny_model, train, val, max_steps=8, log_every=1), tmp_path / "stored")
    (reference,) = references
    init = GPT.from_pretrained(tiny_model).state_dict()
    assert all(torch.equal(value, init[name]) for name, value in reference.model.state_dict().items())
    assert not reference.model.training and not any(p.requires_grad for p in reference.model.parameters())
    assert not (tmp_path / "live" / "ref_logps.safetensors").exists()
    live, stored = metrics_of(tmp_path / "live"), metrics_of(tmp_path / "stored")
    assert live[0]["loss"] == round(math.log(2), 6) and live[0]["rewards/margins"] == 0  # the policy is the reference
    for a, b in zip(live, stored, strict=True):
        for name in ("loss", "rewards/margins", "eval_rewards/margins"):
            assert a.get(name) == pytest.approx(b.get(name), abs=1e-4), name


def test_resume_continues_exactly_and_reads_the_stored_reference_back(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Stopped at step 6 and resumed to 12 == 12 straight (a constant learning rate after warmup
    keeps the schedule independent of max_steps); the resumed run never recomputes the reference."""
    train, val = write_pairs(tmp_path)
    settings = dict(max_steps=12, schedule="linear", warmdown_fraction=0.0, warmup_steps=2, eval_every=3, log_every=3)
    dpo(dpo_config(tiny_model, train, val, **settings), tmp_path / "straight")
    dpo(dpo_config(tiny_model, train, val, **{**settings, "max_steps": 6}), tmp_path / "resumed")
    stored = (tmp_path / "resumed" / "ref_logps.safetensors").read_bytes()

    def recompute(*args, **kwargs):
        raise AssertionError("a resumed run recomputed the reference log-probs")

    with monkeypatch.context() as patch:
        patch.setattr(dpo_module, "reference_table", recompute)
        dpo(dpo_config(tiny_model, train, val, **settings), tmp_path / "resumed", resume=True)
    assert (tmp_path / "resumed" / "ref_logps.safetensors").read_bytes() == stored
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert learning_metrics(tmp_path / "straight") == learning_metrics(tmp_path / "resumed")
    # Resuming on other pairs than the stored log-probs' is refused before anything is written.
    other = write_jsonl(tmp_path / "other.jsonl", word_pairs(48, seed=99))
    before = snapshot(tmp_path / "resumed")
    with pytest.raises(UserError) as error:
        dpo(dpo_config(tiny_model, other, val, **settings), tmp_path / "resumed", resume=True)
    assert_one_line(error, "ref_logps.safetensors", "another data.train")
    assert snapshot(tmp_path / "resumed") == before


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory) -> Path:
    """A model folder whose tokenizer was trained on other text."""
    tokenizer = Tokenizer.train([f"{w} {w[::-1]} {w.upper()}" for w in WORDS] * 20, vocab_size=280)
    folder = tmp_path_factory.mktemp("other") / "model"
    GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)).save_pretrained(
        folder, tokenizer=tokenizer
    )
    return folder


def test_bad_input_is_one_clear_line_and_writes_nothing(
    capfd, tiny_model: Path, other_vocabulary: Path, tmp_path: Path
):
    train, val = write_pairs(tmp_path / "data")
    before = snapshot(tmp_path)
    base = ["--set", f"init={tiny_model}", "--set", f"data.train={train}", "--set", "train.device=cpu"]
    assert_user_error(
        gptlab_in_process(capfd, "dpo", "--out", tmp_path / "r", *base, "--set", f"ref={other_vocabulary}"),
        "another vocabulary",
        str(other_vocabulary),
    )
    assert_user_error(
        gptlab_in_process(capfd, "dpo", "--out", tmp_path / "r", *base, "--set", "loss_type=kto"),
        "loss_type must be one of sigmoid, ipo, hinge, robust",
        "'kto'",
    )
    assert snapshot(tmp_path) == before and not (tmp_path / "r").exists()
    # The same vocabulary check guards a live reference, and a model folder with a copied tokenizer.
    mixed = tmp_path / "mixed"
    shutil.copytree(other_vocabulary, mixed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, mixed / name)
    with pytest.raises(UserError) as error:
        dpo(dpo_config(tiny_model, train, val, ref=mixed, precompute_ref=False), tmp_path / "r")
    assert_one_line(error, "another vocabulary", "logits")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precompute_ref", ["true", "false"])
def test_torchrun_two_processes_match_one_process(tiny_model: Path, tmp_path: Path, precompute_ref: str):
    train, val = write_pairs(tmp_path)
    sets = [
        f"init={tiny_model}",
        f"data.train={train}",
        f"data.val={val}",
        f"precompute_ref={precompute_ref}",
        "train.max_steps=6",
        "train.batch_size=8",
        "train.seq_len=64",
        "train.lr=3e-3",
        "train.eval_every=3",
        "train.eval_batches=2",
        "train.log_every=1",
        "train.device=cpu",
    ]
    args = [a for s in sets for a in ("--set", s)]
    one = gptlab("dpo", "--out", tmp_path / "one", *args, env=ONE_THREAD)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_python(*TORCHRUN_TWO_RANKS, "-m", "gptlab", "dpo", "--out", tmp_path / "two", *args, env=ONE_THREAD)
    assert two.returncode == 0, two.stderr[-3000:]
    logged = [learning_metrics(tmp_path / run) for run in ("one", "two")]
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "eval_loss", "eval_rewards/margins"):
        ones, twos = ([r.get(name) for r in records] for records in logged)
        assert ones == pytest.approx(twos, abs=1e-4), name
    weights = [load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "two")]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-4) for k in weights[0])
