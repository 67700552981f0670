"""The reward model: a GPT trunk with a scalar head, fitted to preference pairs (Bradley-Terry).

The probability that a rater prefers answer ``c`` to ``r`` is modelled as ``σ(r_c - r_r)``, so the
loss is ``-log σ(r_c - r_r - margin)`` averaged over pairs (``margin``: the record's optional
field, 0 without it), plus TRL's optional ``center_rewards_coefficient · mean((r_c + r_r)²)``,
which pins the rewards' mean near zero (the loss sees only differences). The metrics carry TRL
RewardTrainer's names: ``accuracy`` (share of pairs with r_c > r_r), ``margin`` (mean r_c - r_r)
and ``mean_reward``, and the same with ``eval_`` on the held-out file.

The stage starts from a causal LM folder (its trunk, a new score head) and ends with a Hugging
Face sequence-classification folder with the tokenizer, which
``AutoModelForSequenceClassification`` loads. ``RewardScorer`` scores (prompt, response) pairs
with such a folder, rendered exactly as training renders them; the RL stages and the arena use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab import checkpoint
from gptlab.align.sft import load_stage_config
from gptlab.config import to_dict
from gptlab.data.loader import to_device
from gptlab.data.prefs import PairBatches, PrefDataConfig, encode_answer, eval_pair_batches, load_preferences
from gptlab.errors import UserError
from gptlab.model import RewardModel, disable_dropout
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import Runtime, TrainConfig, Trainer, cleanup_runtime, setup_runtime

# What each pair contributes, in the order the evaluation sums them.
PAIR_TERMS = ("loss", "accuracy", "margin", "mean_reward")


@dataclass
class RewardTrainConfig(TrainConfig):
    """The training loop's config with reward-model defaults. ``batch_size`` counts pairs (each two
    sequences). About one epoch of TinyWorld's 5,000 training pairs: reward models overfit beyond
    one (InstructGPT trains a single epoch). The ~1e-5 usual for billion-parameter reward models
    leaves a TinyWorld-sized model (64 wide, two layers) near its starting loss after 300 steps
    (held-out loss 0.64, against 0.54 at 1e-4, on the quick world's pairs); 3e-4 and 1e-3 overfit."""

    max_steps: int = 300
    batch_size: int = 16
    lr: float = 1e-4
    warmup_steps: int = 20
    schedule: str = "linear"
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int = 300


@dataclass
class RewardConfig:
    init: str = "runs/sft/model"  # a causal LM folder (a new score head) or a reward model to train further
    center_rewards_coefficient: float | None = None  # TRL's; 0.01 is the value its docs recommend
    data: PrefDataConfig = field(default_factory=PrefDataConfig)
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)

    def __post_init__(self):
        coefficient = self.center_rewards_coefficient
        if coefficient is not None and not 0 <= coefficient < math.inf:
            raise ValueError(f"center_rewards_coefficient must be finite and >= 0 (or none), got {coefficient}")


def load_config(config_path: str | None, overrides: list[str], out_dir: Path, resume: bool) -> RewardConfig:
    """Resolve the config as SFT does (``load_stage_config``)."""
    return load_stage_config(RewardConfig, config_path, overrides, out_dir, resume)


# ----------------------------------------------------------------------------- the loss


def pair_terms(rewards: torch.Tensor, margin: torch.Tensor, center_rewards_coefficient: float | None = None) -> dict:
    """Each pair's share (B,) of the loss and of the metrics (``PAIR_TERMS``). ``rewards`` (2B,):
    the chosen answers' then the rejected ones', as a pair batch holds them."""
    chosen, rejected = rewards.chunk(2)
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (chosen + rejected) ** 2
    return {
        "loss": loss,
        "accuracy": (chosen > rejected).float(),
        "margin": chosen - rejected,
        "mean_reward": (chosen + rejected) / 2,
    }


def reward_loss(model: torch.nn.Module, batch: dict, center_rewards_coefficient: float | None = None):
    """(mean loss, mean metrics) of a micro-batch of pairs, for the training loop."""
    terms = pair_terms(model(batch["input_ids"], batch["attention_mask"]), batch["margin"], center_rewards_coefficient)
    loss = terms.pop("loss").mean()
    return loss, {name: value.mean() for name, value in terms.items()}


def validation(batches: list[dict], runtime: Runtime, center_rewards_coefficient: float | None):
    """eval_loss, eval_accuracy, eval_margin, eval_mean_reward: means over the held-out pairs (all ranks)."""

    def evaluate(model: torch.nn.Module) -> dict:
        sums = torch.zeros(len(PAIR_TERMS) + 1, device=runtime.device)  # the terms' sums, then the pair count
        for batch in batches:
            batch = to_device(batch, runtime.device)
            rewards = model(batch["input_ids"], batch["attention_mask"])
            terms = pair_terms(rewards, batch["margin"], center_rewards_coefficient)
            sums += torch.stack([*(terms[name].sum() for name in PAIR_TERMS), sums.new_tensor(len(batch["margin"]))])
        sums = runtime.mean(sums)  # means of sums over ranks divide to the ratio of totals
        return {f"eval_{name}": round((sums[i] / sums[-1]).item(), 6) for i, name in enumerate(PAIR_TERMS)}

    return evaluate


# ----------------------------------------------------------------------------- the stage


def load_init(path: str | Path) -> RewardModel:
    """The model a run starts from: a causal LM's trunk with a new score head (the usual start), or a
    reward model trained further."""
    folder, hf = checkpoint.read_config(path)
    if checkpoint.is_reward_model(hf):
        return disable_dropout(RewardModel.from_pretrained(folder, dtype=torch.float32))
    return disable_dropout(RewardModel.from_causal_lm(folder, dtype=torch.float32))


def check_init(cfg: RewardConfig, model: RewardModel, tokenizer: Tokenizer) -> None:
    """The init folder's model and tokenizer fit the run and the exported folder."""
    block_size = model.config.block_size
    if cfg.train.seq_len > block_size:
        raise UserError(
            f"train.seq_len {cfg.train.seq_len} is longer than the model's block_size {block_size}; "
            f"lower train.seq_len to at most {block_size}"
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"the tokenizer in {cfg.init} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}: the folder mixes files from different runs"
        )
    if tokenizer.pad_id is None:
        raise UserError(
            f"the tokenizer in {cfg.init} has no pad token, and transformers finds a reward model's scored token "
            "by the pad id (config.json's pad_token_id); use a tokenizer with one, as `gptlab tokenizer` trains"
        )


def reward(cfg: RewardConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> RewardModel:
    """Train a reward model from ``cfg.init`` on ``cfg.data`` into ``out_dir`` (run.json, metrics.jsonl,
    checkpoints/, model/); returns the trained model."""
    out_dir = Path(out_dir)
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)  # the new score head is drawn here, as TRL seeds before building the model
    model = load_init(cfg.init)
    tokenizer = Tokenizer.from_pretrained(cfg.init)
    check_init(cfg, model, tokenizer)
    runtime = setup_runtime(tcfg)
    try:
        micro, _ = runtime.micro_batching(tcfg)
        train, val, stats = load_preferences(cfg.data, tokenizer, tcfg.seq_len, warn=runtime.is_main)
        batches = PairBatches(
            train,
            micro_batch_size=micro,
            pad_id=tokenizer.pad_id,
            seed=tcfg.seed,
            rank=runtime.rank,
            world_size=runtime.world_size,
            device=runtime.device,
        )
        val_batches = eval_pair_batches(
            val,
            micro_batch_size=micro,
            pad_id=tokenizer.pad_id,
            max_batches=tcfg.eval_batches,
            rank=runtime.rank,
            world_size=runtime.world_size,
        )
        coefficient = cfg.center_rewards_coefficient
        evaluate = validation(val_batches, runtime, coefficient) if val_batches else None
        trainer = Trainer(
            model,
            tcfg,
            runtime,
            out_dir,
            partial(reward_loss, center_rewards_coefficient=coefficient),
            batches,
            evaluate=evaluate,
            tokenizer=tokenizer,
            progress_metrics=("accuracy",),
        )
        return trainer.run("reward", to_dict(cfg), resume, overwrite, data={s: st.to_dict() for s, st in stats.items()})
    finally:
        cleanup_runtime(runtime)


# ----------------------------------------------------------------------------- scoring


class RewardScorer:
    """Scores (prompt, response) pairs with a reward model, in batches.

    A prompt is a string or a list of messages; a response a string, an assistant message or a list
    of messages. Each pair is rendered exactly as training renders an answer after its prompt
    (``gptlab.data.prefs.encode_answer``): the chat template for messages, ``<|bos|> prompt
    response <|eos|>`` for strings. A prompt too long for the model is cut from its left, as
    training cuts it.
    """

    def __init__(self, model: RewardModel, tokenizer: Tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = model.score.weight.device
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0  # any id: the mask decides

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=None) -> RewardScorer:
        """The scorer of a reward-model folder (a causal LM folder is refused in one line)."""
        return cls(RewardModel.from_pretrained(path, device=device, dtype=dtype), Tokenizer.from_pretrained(path))

    def render(self, prompt, response) -> list[int]:
        """The token ids the model scores for one pair."""
        ids, _, start = encode_answer(self.tokenizer, prompt, response)
        room = self.model.config.block_size - (len(ids) - start)  # for the prompt; at least one token
        if room < 1:
            raise UserError(
                f"a response of {len(ids) - start} tokens does not fit the reward model's block_size "
                f"{self.model.config.block_size} after a prompt token; shorten the response"
            )
        return ids[max(0, start - room) :]

    def score(self, prompts: list, responses: list, batch_size: int = 32) -> list[float]:
        """The reward of each (prompt, response) pair, in order."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: give one response per prompt")
        return self.score_ids([self.render(p, r) for p, r in zip(prompts, responses)], batch_size)

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], batch_size: int = 32) -> list[float]:
        """The reward of each token sequence (already rendered, e.g. a policy's prompt + sample)."""
        scores = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            ids = torch.full((len(chunk), max(map(len, chunk))), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, sequence in enumerate(chunk):
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            scores += self.model(ids.to(self.device), mask.to(self.device)).tolist()
        return scores
