"""PPO against a small reward model: learning with a finite KL that is non-negative on average, the
KL term the metrics report, a reference that never changes, the value model saved beside the policy,
exact resume after SIGKILL (policy and value model), the report card and bad input."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import gptlab.align.ppo as ppo_module
from gptlab.align.ppo import PpoConfig, PpoTrainConfig, ppo
from gptlab.align.rollouts import FrozenPolicy, PromptDataConfig
from gptlab.checkpoint import read_config
from gptlab.model import GPT, ModelConfig, RewardModel
from gptlab.runs import RunFolder
from gptlab.tokenizer import Tokenizer
from helpers import (
    WORDS,
    assert_same_tensors,
    assert_user_error,
    gptlab_in_process,
    logged_metrics,
    straight_and_resumed,
    write_jsonl,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small train fastest on one thread (several threads mostly wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tiny_model: Path, tmp_path_factory) -> Path:
    """Chat prompts of 1 to 5 words, and a reward model that scores an answer by its last token: the tiny
    model's trunk with its blocks' outputs zeroed (the last hidden state is that token's normed embedding)
    read by a random head, so a policy that shifts its tokens towards high-scoring ones raises its score."""
    root = tmp_path_factory.mktemp("ppo_data")
    rng = random.Random(0)
    prompts = [
        {"prompt": [{"role": "user", "content": " ".join(rng.sample(WORDS, rng.randint(1, 5)))}]} for _ in range(40)
    ]
    write_jsonl(root / "prompts.jsonl", prompts)
    reward = RewardModel.from_causal_lm(tiny_model)
    with torch.no_grad():
        for block in reward.trunk.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.down.weight.zero_()
        reward.score.weight.copy_(
            torch.randn(reward.score.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.2
        )
    reward.save_pretrained(root / "reward", tokenizer=Tokenizer.from_pretrained(tiny_model))
    return root


def ppo_config(init: Path, data: Path, **settings) -> PpoConfig:
    top = {key: settings.pop(key) for key in ("kl_coef", "kl_estimator", "missing_eos_penalty") if key in settings}
    train = dict(max_steps=60, batch_size=16, lr=1e-2, log_every=4, save_every=0, seed=0, device="cpu")
    train.update(settings)
    return PpoConfig(
        init=str(init),
        reward_model=str(data / "reward"),
        data=PromptDataConfig(prompts=str(data / "prompts.jsonl")),
        max_new_tokens=4,
        num_mini_batches=2,
        ppo_epochs=2,
        train=PpoTrainConfig(**train),
        **top,
    )


def test_ppo_raises_the_score_with_a_finite_non_negative_kl(
    tiny_model: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    references = []

    class Recorded(FrozenPolicy):
        def __init__(self, model):
            super().__init__(model)
            references.append(self)

    monkeypatch.setattr(ppo_module, "FrozenPolicy", Recorded)
    ppo(ppo_config(tiny_model, data, kl_coef=0.05), tmp_path / "run")
    logged = RunFolder(tmp_path / "run").read_metrics()
    scores = [m["objective/scores"] for m in logged]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.3, scores
    kls = [m["objective/kl"] for m in logged]
    assert all(math.isfinite(kl) for kl in kls) and np.mean(kls) >= 0 and logged[0]["objective/kl"] == 0
    for m in logged:  # the KL term is what the metrics say: kl_coef times the summed KL, taken from the score
        assert m["objective/non_score_reward"] == pytest.approx(-0.05 * m["objective/kl"], abs=1e-5)
        assert m["objective/rlhf_reward"] == pytest.approx(
            m["objective/scores"] + m["objective/non_score_reward"], abs=1e-5
        )
    expected = {"policy/clipfrac_avg", "policy/approxkl_avg", "loss/policy_avg", "loss/value_avg", "val/ratio"}
    assert expected | {"objective/entropy", "val/num_eos_tokens"} <= logged[-1].keys()
    (reference,) = references
    init = GPT.from_pretrained(tiny_model).state_dict()
    assert all(torch.equal(value, init[name]) for name, value in reference.model.state_dict().items())
    # model/ is the policy alone; each checkpoint also holds the value model, a reward-model folder.
    checkpoint = RunFolder(tmp_path / "run").checkpoints()[-1]
    assert read_config(checkpoint / "value_model")[1]["architectures"] == ["LlamaForSequenceClassification"]
    assert not (tmp_path / "run" / "model" / "value_model").exists()
    assert GPT.from_pretrained(tmp_path / "run" / "model").config == GPT.from_pretrained(tiny_model).config


def test_resume_after_sigkill_equals_the_uninterrupted_run(capfd, tiny_model: Path, data: Path, tmp_path: Path):
    """A rollout serves 2 epochs x 2 mini-batches = 4 steps; the kill comes after the checkpoint at step
    4. The resumed run continues the policy and the value model bit for bit."""
    sets = [
        f"init={tiny_model}",
        f"reward_model={data / 'reward'}",
        f"data.prompts={data / 'prompts.jsonl'}",
        "max_new_tokens=4",
        "ppo_epochs=2",
        "num_mini_batches=2",
        "missing_eos_penalty=1.0",
        "kl_estimator=k3",
        "train.max_steps=8",
        "train.save_every=4",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.lr=1e-2",
        "train.log_every=1",
        "train.device=cpu",
    ]
    straight, out = straight_and_resumed("ppo", sets, tmp_path, "step-0000004")
    for part in ("model/model.safetensors", "checkpoints/step-0000008/value_model/model.safetensors"):
        assert_same_tensors(straight / part, out / part)
    assert logged_metrics(straight) == logged_metrics(out) and len(logged_metrics(out)) == 8
    assert gptlab_in_process(capfd, "report", out).returncode == 0
    report = (out / "report.md").read_text()
    assert "| objective/scores, first → last logged |" in report and "objective/kl" in report and "(rl.png)" in report


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory) -> Path:
    """A reward-model folder whose tokenizer was trained on other text."""
    tokenizer = Tokenizer.train([f"{w} {w[::-1]} {w.upper()}" for w in WORDS] * 20, vocab_size=280)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    folder = tmp_path_factory.mktemp("other") / "reward"
    RewardModel(config).save_pretrained(folder, tokenizer=tokenizer)
    return folder


def test_bad_input_is_one_clear_line(capfd, tiny_model: Path, data: Path, other_vocabulary: Path, tmp_path: Path):
    base = [
        "--set",
        f"init={tiny_model}",
        "--set",
        f"data.prompts={data / 'prompts.jsonl'}",
        "--set",
        "train.device=cpu",
    ]

    def refused(*sets: str, words: tuple[str, ...]):
        args = [a for s in sets for a in ("--set", s)]
        assert_user_error(gptlab_in_process(capfd, "ppo", "--out", tmp_path / "r", *base, *args), *words)

    reward = f"reward_model={data / 'reward'}"
    refused(f"reward_model={tiny_model}", words=("holds a causal language model", "not a reward model"))
    refused(f"reward_model={other_vocabulary}", words=("reward model", "another tokenizer than the policy"))
    refused(reward, "kl_estimator=k2", words=("kl_estimator must be one of k1, k3",))
    refused(reward, "train.save_every=6", words=("train.save_every 6", "ppo_epochs x num_mini_batches", "4 or 8"))
    refused(reward, "train.parallelism=fsdp", words=("train.parallelism=ddp",))
    refused(reward, f"data.prompts={tmp_path / 'none.jsonl'}", words=("none.jsonl does not exist",))
    refused(reward, "max_new_tokens=400", words=("max_new_tokens 400 leaves no room for a prompt",))
    assert not (tmp_path / "r").exists()
