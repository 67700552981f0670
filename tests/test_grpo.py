"""GRPO and the rollouts it shares with PPO: prompt files, the engine's log-probs against the training
forward, seeded rollouts, no gradient from a group of equal rewards, the reward functions (arith,
weights, a user's file), the reference that never changes, learning, exact resume after SIGKILL, the
report card and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gptlab.align.grpo as grpo_module
from gptlab.align.grpo import GrpoConfig, GrpoTrainConfig, grpo, grpo_objective
from gptlab.align.reward_functions import arith, gold_number, stated_number
from gptlab.align.rl import group_advantages
from gptlab.align.rollouts import (
    FrozenPolicy,
    PromptDataConfig,
    RolloutBatches,
    RolloutSampling,
    forward_inputs,
    load_prompts,
    policy_logprobs,
    response_logits,
    rollout_seed,
    sample_rollout,
    stop_ids_of,
)
from gptlab.engine import Engine
from gptlab.model import GPT, ModelConfig
from gptlab.runs import RunFolder
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import Runtime
from helpers import (
    ONE_THREAD,
    TORCHRUN_TWO_RANKS,
    WORDS,
    assert_same_tensors,
    assert_user_error,
    gptlab_in_process,
    logged_metrics,
    run_python,
    straight_and_resumed,
    write_jsonl,
)

REWARDS_PY = '''
def letter_a(prompts, completions, **kwargs):
    """The share of an answer's characters that are the letter a."""
    texts = [c[0]["content"] for c in completions]
    return [t.count("a") / max(1, len(t)) for t in texts]

def one(prompts, completions):
    return [1.0] * len(completions)

def family_echo(prompts, completions, family, **kwargs):
    return [float(f == "greek") for f in family]

def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)

def boom(prompts, completions, **kwargs):
    raise ValueError("the grader is down")
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small train fastest on one thread (several threads mostly wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model)


def word_prompts(n: int, seed: int) -> list[dict]:
    """Chat prompts of 1 to 5 words (prompts of different lengths share a rollout)."""
    rng = random.Random(seed)
    return [
        {"prompt": [{"role": "user", "content": " ".join(rng.sample(WORDS, rng.randint(1, 5)))}], "family": "greek"}
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpo_data")
    write_jsonl(root / "prompts.jsonl", word_prompts(40, seed=0))
    (root / "rewards.py").write_text(REWARDS_PY)
    return root


# ----------------------------------------------------------------------------- prompts and rollouts


def test_prompt_files_in_every_format(tok: Tokenizer, tmp_path: Path, capsys):
    records = [
        {"prompt": [{"role": "user", "content": "alpha beta"}], "family": "greek"},
        {"prompt": "alpha beta"},
        {"messages": [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"}]},
        {"question": "12+35=?", "answer": "#### 47"},
        {"prompt": [{"role": "user", "content": " ".join(WORDS * 3)}]},
    ]
    prompts, stats = load_prompts(write_jsonl(tmp_path / "p.jsonl", records), tok, max_tokens=30)
    chat = tok.apply_chat_template([{"role": "user", "content": "alpha beta"}], add_generation_prompt=True)
    assert prompts[0].ids == chat and prompts[0].columns == {"family": "greek"} and prompts[0].conversational
    assert prompts[1].ids == [tok.bos_id] + tok.encode("alpha beta", add_special_tokens=False)
    assert prompts[2].prompt == [{"role": "user", "content": "alpha"}]  # an SFT record: before its reply
    assert prompts[3].prompt == [{"role": "user", "content": "12+35=?"}] and prompts[3].columns == {"answer": "#### 47"}
    assert len(prompts[4].ids) == 30 and prompts[4].ids[-1] == chat[-1]  # cut from the left
    assert stats.truncated == 1 and "cut 1 of 5 prompts from the left to 30 tokens" in capsys.readouterr().err
    only, stats = load_prompts(tmp_path / "p.jsonl", tok, max_tokens=30, families=["greek"])
    assert [p.prompt for p in only] == [records[0]["prompt"]] and stats.skipped == 4


def rollout_of(model: GPT, tok: Tokenizer, prompts_file: Path, temperature: float, seed: int = 0, engine=None):
    """Three answers to each of three prompts of different lengths, up to 12 tokens each."""
    prompts, _ = load_prompts(prompts_file, tok, max_tokens=40)
    sampling = RolloutSampling(max_new_tokens=12, temperature=temperature)
    return sample_rollout(engine or Engine(model, tok), prompts[:3], 3, sampling, seed, stop_ids_of(tok))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_engines_log_probs_equal_the_training_forward(
    tiny_model: Path, tok: Tokenizer, data: Path, temperature: float
):
    """The engine returns the log-probs of the raw logits (the sampling distribution at temperature 1);
    the training forward reads the same tokens, left-padded prompts and all, to within 1e-4."""
    model = GPT.from_pretrained(tiny_model)
    rollout = rollout_of(model, tok, data / "prompts.jsonl", temperature)
    batch = rollout.batch()
    assert (batch["attention_mask"][:, : rollout.prompt_width] == 0).any()  # some prompt is left-padded
    assert batch["response_mask"].sum(1).tolist() == [len(r) for r in rollout.responses]
    with torch.no_grad():
        forward = policy_logprobs(model, batch, 1.0)
    torch.testing.assert_close(forward, rollout.logprobs, rtol=0, atol=1e-4)
    assert (rollout.logprobs[batch["response_mask"] == 0] == 0).all()
    assert rollout.ended.tolist() == [bool(r) and r[-1] in stop_ids_of(tok) for r in rollout.responses]


def test_the_engine_samples_from_the_weights_being_trained(tok: Tokenizer, data: Path):
    """Linear layers this large go through the engine's prepacked copies on the CPU; after an optimizer
    step the same engine samples what a new one does, with the log-probs of the updated weights."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=4, n_embd=384))
    engine = Engine(model, tok)
    before = rollout_of(model, tok, data / "prompts.jsonl", 1.0, engine=engine)
    assert len(engine.packed.linears) == 4  # packed, where this CPU build packs
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy_logprobs(model, before.batch(), 1.0).sum().backward()
    optimizer.step()
    after = rollout_of(model, tok, data / "prompts.jsonl", 1.0, engine=engine)
    fresh = rollout_of(model, tok, data / "prompts.jsonl", 1.0, engine=Engine(model, tok))
    assert after.responses == fresh.responses and after.responses != before.responses
    torch.testing.assert_close(after.logprobs, fresh.logprobs, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(policy_logprobs(model, after.batch(), 1.0), after.logprobs, rtol=0, atol=1e-4)


def test_rollouts_are_seeded_by_run_seed_rollout_and_rank(tiny_model: Path, tok: Tokenizer, data: Path):
    model = GPT.from_pretrained(tiny_model)
    again = [
        rollout_of(model, tok, data / "prompts.jsonl", 1.0, seed=rollout_seed(7, 3, 0)).responses for _ in range(2)
    ]
    assert again[0] == again[1]
    assert rollout_of(model, tok, data / "prompts.jsonl", 1.0, seed=rollout_seed(7, 4, 0)).responses != again[0]
    assert len({rollout_seed(7, 3, 0), rollout_seed(7, 3, 1), rollout_seed(8, 3, 0), rollout_seed(7, 4, 0)}) == 4


def test_a_group_of_equal_rewards_gives_no_policy_gradient(tiny_model: Path, tok: Tokenizer, data: Path):
    model = GPT.from_pretrained(tiny_model)
    rollout = rollout_of(model, tok, data / "prompts.jsonl", 1.0)
    batch = rollout.batch()
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.3, 0.3, 0.9])  # group 0: all equal
    cfg = GrpoConfig(num_generations=3, loss_type="grpo")
    batch.update(
        old_logprobs=rollout.logprobs,
        advantages=group_advantages(rewards, 3, "group"),
        tokens_share=batch["response_mask"].sum(),
    )
    positions, mask = forward_inputs(batch)
    logits = response_logits(model(batch["input_ids"], position_ids=positions, attn_mask=mask), batch, 1.0)
    logits = logits.detach().requires_grad_(True)
    loss, metrics = grpo_objective(cfg, logits, batch)
    loss.backward()
    per_row = logits.grad.abs().sum((1, 2))
    assert (per_row[:3] == 0).all() and (per_row[3:] > 0).all()
    assert {"entropy", "clip_ratio/region_mean"} <= metrics.keys() and "kl" not in metrics


class TwoRanks(Runtime):
    """Rank ``rank`` of two, without a process group: the other rank's counts are taken to be this one's."""

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value


def test_each_rank_rolls_out_its_share_of_the_prompts(tok: Tokenizer, data: Path):
    """A rollout of 4 prompts: one process takes all 4, two ranks 2 each, the same 4 between them;
    the next rollout takes the next 4 prompts of the shuffled order."""
    prompts, _ = load_prompts(data / "prompts.jsonl", tok, max_tokens=100)
    seen: dict[int, list[list[int]]] = {}

    def collector(rank: int):
        def collect(chosen, index):
            seen.setdefault(rank, []).append([p.index for p in chosen])
            rows = {
                "input_ids": torch.zeros(len(chosen), 3, dtype=torch.long),
                "attention_mask": torch.ones(len(chosen), 3),
            }
            rows["response_mask"] = torch.ones(len(chosen), 1)
            return {"rows": rows, "prompt_width": 2, "metrics": {}}

        return collect

    for rank, runtime in (
        (-1, Runtime(torch.device("cpu"), None)),
        *((r, TwoRanks(torch.device("cpu"), None, r, r, 2)) for r in (0, 1)),
    ):
        share = 4 if rank < 0 else 2
        batches = RolloutBatches(
            prompts,
            collector(rank),
            prompts_per_rollout=4,
            rows_per_step=4,
            micro_batch_size=share,
            minibatches=1,
            epochs=1,
            seed=3,
            runtime=runtime,
        )
        for _ in range(2):
            batch = batches.next_batch()
            assert batch["input_ids"].shape == (share, 3) and batch["tokens_share"].item() == share
        assert batches.state_dict() == {"rollouts": 2, "prompt_epoch": 0, "prompt_position": 8}
    assert [seen[0][k] + seen[1][k] for k in range(2)] == seen[-1] and seen[-1][0] != seen[-1][1]


# ----------------------------------------------------------------------------- reward functions


def test_arith_checks_the_stated_answer_against_the_prompt_or_the_records_answer():
    prompts = [
        [{"role": "user", "content": "What is 12+35?"}],
        "Add 12 and 35.",
        [{"role": "user", "content": "Multiply 6 by 7."}],
        [{"role": "user", "content": "91+75=?"}],
        "Reverse plomet.",
        "Subtract 50 from 20.",
    ]
    completions = [
        [{"role": "assistant", "content": "The answer is 47."}],
        "I think 40, no: the answer is 47.",
        [{"role": "assistant", "content": "6*7 = 42"}],
        [{"role": "assistant", "content": "#### 166"}],
        "The answer is temolp.",
        "The answer is -30.",
    ]
    answers = [None, None, None, "Let's think. The answer is 166.\n#### 166", None, None]
    assert arith(prompts, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, None, 1.0]
    assert arith(prompts[:1], ["The answer is 48."]) == [0.0]
    assert stated_number("1,234 and 5") == 5 and stated_number("#### 1,234") == 1234 and stated_number("none") is None
    assert gold_number("anything", 12) == 12 and gold_number("Compute 7*8.") == 56 and gold_number("hello") is None


# ----------------------------------------------------------------------------- training


def grpo_config(init: Path, prompts: Path, **settings) -> GrpoConfig:
    top = {
        key: settings.pop(key)
        for key in ("reward", "reward_weights", "beta", "num_generations", "num_iterations", "loss_type")
        if key in settings
    }
    train = dict(max_steps=30, batch_size=16, lr=1e-2, log_every=5, save_every=0, seed=0, device="cpu", warmup_steps=0)
    train.update(settings)
    return GrpoConfig(
        init=str(init),
        data=PromptDataConfig(prompts=str(prompts)),
        max_new_tokens=12,
        **{"num_generations": 4, **top},
        train=GrpoTrainConfig(**train),
    )


def metrics_of(run: Path) -> list[dict]:
    return RunFolder(run).read_metrics()


def test_grpo_with_a_user_reward_function_raises_the_reward(tiny_model: Path, data: Path, tmp_path: Path):
    cfg = grpo_config(tiny_model, data / "prompts.jsonl", reward=[f"{data / 'rewards.py'}:letter_a"])
    grpo(cfg, tmp_path / "run")
    logged = metrics_of(tmp_path / "run")
    first, last = logged[0], logged[-1]
    assert last["reward"] > first["reward"] + 0.1, [m["reward"] for m in logged]
    assert last["rewards/letter_a/mean"] == last["reward"]  # one function, weight 1
    expected = {
        "reward_std",
        "rewards/letter_a/std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "frac_reward_zero_std",
        "entropy",
        "clip_ratio/region_mean",
    }
    assert expected <= last.keys() and "kl" not in last
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["kind"] == "grpo" and run["data"]["prompts"]["records"] == 40


def test_the_reference_never_changes_and_weighted_rewards_add_up(
    tiny_model: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    references = []

    class Recorded(FrozenPolicy):
        def __init__(self, model):
            super().__init__(model)
            references.append(self)

    monkeypatch.setattr(grpo_module, "FrozenPolicy", Recorded)
    rewards = data / "rewards.py"
    cfg = grpo_config(
        tiny_model,
        data / "prompts.jsonl",
        reward=[f"{rewards}:one", f"{rewards}:letter_a", f"{rewards}:family_echo"],
        reward_weights=[0.5, 2.0, 1.0],
        beta=0.1,
        max_steps=6,
        log_every=1,
    )
    grpo(cfg, tmp_path / "run")
    (reference,) = references
    init = GPT.from_pretrained(tiny_model).state_dict()
    assert all(torch.equal(value, init[name]) for name, value in reference.model.state_dict().items())
    assert not reference.model.training and not any(p.requires_grad for p in reference.model.parameters())
    logged = metrics_of(tmp_path / "run")
    assert logged[0]["kl"] == 0 and all(m["kl"] >= 0 for m in logged) and logged[-1]["kl"] > 0
    for m in logged:
        weighted = 0.5 * m["rewards/one/mean"] + 2.0 * m["rewards/letter_a/mean"] + m["rewards/family_echo/mean"]
        assert m["reward"] == pytest.approx(weighted, abs=1e-5)
        assert m["rewards/one/mean"] == 1.0 and m["rewards/family_echo/mean"] == 1.0


def test_equal_rewards_leave_the_policy_as_it_was(tiny_model: Path, data: Path, tmp_path: Path):
    """Every group's rewards are equal: no advantage, no gradient, so AdamW never moves a weight."""
    cfg = grpo_config(tiny_model, data / "prompts.jsonl", reward=[f"{data / 'rewards.py'}:constant"], max_steps=3)
    grpo(cfg, tmp_path / "run")
    init, trained = (
        load_file(tiny_model / "model.safetensors"),
        load_file(tmp_path / "run" / "model" / "model.safetensors"),
    )
    assert all(torch.equal(init[name], trained[name]) for name in init)
    assert metrics_of(tmp_path / "run")[-1]["frac_reward_zero_std"] == 1.0


def test_resume_after_sigkill_equals_the_uninterrupted_run(capfd, tiny_model: Path, data: Path, tmp_path: Path):
    """Two passes over each rollout (num_iterations=2): the kill comes after the checkpoint at step 2,
    between rollouts; the resumed run draws rollout 2 from the same weights, prompts and seed."""
    sets = [
        f"init={tiny_model}",
        f"data.prompts={data / 'prompts.jsonl'}",
        f"reward={data / 'rewards.py'}:letter_a",
        "num_generations=4",
        "num_iterations=2",
        "max_new_tokens=8",
        "train.max_steps=6",
        "train.save_every=2",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.lr=1e-2",
        "train.log_every=1",
        "train.device=cpu",
    ]
    straight, out = straight_and_resumed("grpo", sets, tmp_path, "step-0000002")
    assert_same_tensors(straight / "model" / "model.safetensors", out / "model" / "model.safetensors")
    assert logged_metrics(straight) == logged_metrics(out) and len(logged_metrics(out)) == 6
    # The card: the rewards, first and last, and the curves.
    assert gptlab_in_process(capfd, "report", out).returncode == 0
    report = (out / "report.md").read_text()
    assert "| reward, first → last logged |" in report and "rewards/letter_a/mean" in report and "(rl.png)" in report


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_line(capfd, tiny_model: Path, data: Path, tmp_path: Path):
    rewards = data / "rewards.py"
    base = [
        "--set",
        f"init={tiny_model}",
        "--set",
        f"data.prompts={data / 'prompts.jsonl'}",
        "--set",
        "train.device=cpu",
    ]
    base += ["--set", "num_generations=4", "--set", "train.batch_size=8", "--set", "max_new_tokens=4"]

    def refused(*sets: str, words: tuple[str, ...]):
        args = [a for s in sets for a in ("--set", s)]
        assert_user_error(gptlab_in_process(capfd, "grpo", "--out", tmp_path / "r", *base, *args), *words)

    refused(f"reward={tiny_model}", words=("holds a causal language model", "not a reward model"))
    refused("reward=arith", "num_generations=1", words=("num_generations must be at least 2",))
    refused("reward=arith", "reward_weights=[nan]", words=("reward_weights must be finite numbers",))
    refused(f"reward={tmp_path / 'missing.py'}:f", words=("missing.py does not exist",))
    refused(f"reward={rewards}:nope", words=("has no function 'nope'", "letter_a"))
    # A function that raises does so at the first rollout, under the progress bar: its line ends the output.
    result = gptlab_in_process(capfd, "grpo", "--out", tmp_path / "r2", *base, "--set", f"reward={rewards}:boom")
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr and errors == result.stderr.splitlines()[-1:]
    assert (
        errors[0].startswith("gptlab: error: reward function")
        and "boom raised ValueError: the grader is down" in errors[0]
    )
    refused("reward=arith", "train.parallelism=fsdp", words=("train.parallelism=ddp",))
    refused("reward=arith", "train.max_steps=5", "num_iterations=2", words=("train.max_steps 5", "use 4 or 6"))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    refused("reward=arith", f"data.prompts={empty}", words=("holds no prompts",))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "alpha"}, {"answer": "no prompt"}])
    refused("reward=arith", f"data.prompts={bad}", words=("bad.jsonl:2", "expected a 'prompt'"))


@pytest.mark.slow
def test_torchrun_two_processes_train(tiny_model: Path, data: Path, tmp_path: Path):
    """Under torchrun each rank rolls out its share of a rollout's prompts; the ranks step together."""
    sets = [
        f"init={tiny_model}",
        f"data.prompts={data / 'prompts.jsonl'}",
        f"reward={data / 'rewards.py'}:letter_a",
        "num_generations=4",
        "max_new_tokens=8",
        "train.max_steps=4",
        "train.batch_size=16",
        "train.log_every=1",
        "train.device=cpu",
    ]
    args = [a for s in sets for a in ("--set", s)]
    two = run_python(*TORCHRUN_TWO_RANKS, "-m", "gptlab", "grpo", "--out", tmp_path / "two", *args, env=ONE_THREAD)
    assert two.returncode == 0, two.stderr[-3000:]
    logged = metrics_of(tmp_path / "two")
    assert len(logged) == 4 and all(0 <= m["reward"] <= 1 for m in logged)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
