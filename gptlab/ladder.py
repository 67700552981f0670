"""`gptlab ladder`: the scaling and emergence study on one machine.

A ladder is a list of model sizes from one dial (depth; width and heads follow, see
``scaling.ladder_config``), each pretrained on the same corpus for a budget that grows with its
size, then evaluated on the abilities the lecture's claims are about: next-token loss before and
after training, world_mmlu at 0 and k shots (as many as the window holds: 2 on the CPU presets, 5 on
the GPU one), arithmetic by digits under standard and chain-of-thought prompting (exact match and
partial credit), and the word tasks at k = 0..8 examples. Each run lives in ``OUT/runs/d{depth}`` and is
skipped when its ``result.json`` is there, so a killed ladder resumes run by run (and a killed
run resumes from its last checkpoint). ``OUT/ladder.json`` holds every run and the fits;
``gptlab.report`` turns it into ``report.md`` with plots.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab import scaling
from gptlab.config import apply_overrides, build, read_raw, to_dict
from gptlab.data import TokenLoader, iter_documents, prepare, read_meta
from gptlab.errors import UserError
from gptlab.eval import GptlabBackend, evaluate, warnings_as_lines
from gptlab.eval.tasks import load_task
from gptlab.fileio import write_json_atomic, write_text_atomic
from gptlab.logprobs import IGNORE, token_logprobs
from gptlab.model import GPT
from gptlab.pretrain import PretrainConfig, pretrain
from gptlab.runs import RunFolder
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import TrainConfig
from gptlab.world import write_world
from gptlab.world.words import SAME_FORMAT_TASK_NAMES


@dataclass
class SizesConfig:
    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    aspect: int = 24  # width = depth * aspect, rounded up to a multiple of head_dim
    head_dim: int = 16
    family: str = "llama"
    block_size: int = 512
    # The budget of each run: tokens per parameter (all parameters, as Chinchilla counts them),
    # or, when set, a fixed number of FLOPs per run (then bigger models see fewer tokens).
    tokens_per_param: float = 4.0
    flops: float | None = None
    min_steps: int = 20

    def __post_init__(self):
        checks = [
            (
                bool(self.depths) and len(set(self.depths)) == len(self.depths) and min(self.depths) >= 1,
                f"sizes.depths must list distinct depths >= 1, e.g. [2, 3, 4], got {self.depths}",
            ),
            (self.aspect >= 1, f"sizes.aspect must be at least 1, got {self.aspect}"),
            (self.head_dim >= 1, f"sizes.head_dim must be at least 1, got {self.head_dim}"),
            (self.block_size >= 1, f"sizes.block_size must be at least 1, got {self.block_size}"),
            (
                0 < self.tokens_per_param < math.inf,
                f"sizes.tokens_per_param must be a positive finite number, got {self.tokens_per_param}",
            ),
            (
                self.flops is None or 0 < self.flops < math.inf,
                f"sizes.flops must be a positive finite number (or none), got {self.flops}",
            ),
            (self.min_steps >= 1, f"sizes.min_steps must be at least 1, got {self.min_steps}"),
        ]
        raise_first(checks)


@dataclass
class DataConfig:
    world: str | None = None  # a TinyWorld folder; None: write one into OUT/world
    world_preset: str = "default"
    world_seed: int = 0
    shards: str | None = None  # `gptlab prepare` output of the world's corpus; None: made in OUT/shards
    # 263 = the 256 bytes + gptlab's 7 special tokens: one token per character. Word tasks work
    # on letters, which small models cannot see inside multi-letter BPE tokens (docs/tinyworld.md).
    vocab_size: int = 263

    def __post_init__(self):
        if self.world_seed < 0:
            raise ValueError(f"data.world_seed must be >= 0, got {self.world_seed}")


@dataclass
class EvalConfig:
    limit: int | None = 60  # questions per task (and per world_mmlu subject); None: all
    batch_size: int = 32
    # 2 shots: the most whose every request fits the CPU presets' 512-token window (docs/scaling.md,
    # "world_mmlu and the window"); the ladder refuses shot counts whose requests would be cut.
    mmlu_shots: list[int] = field(default_factory=lambda: [0, 2])
    word_tasks: list[str] = field(default_factory=lambda: list(SAME_FORMAT_TASK_NAMES))
    word_shots: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    # Empty: every arithmetic task of the world.
    arith_tasks: list[str] = field(default_factory=lambda: ["add_2", "add_3", "sub_2", "sub_3", "mul_2"])

    def __post_init__(self):
        shots = [*self.mmlu_shots, *self.word_shots]
        raise_first(
            [
                (self.limit is None or self.limit >= 1, f"eval.limit must be at least 1 (or none), got {self.limit}"),
                (self.batch_size >= 1, f"eval.batch_size must be at least 1, got {self.batch_size}"),
                (min(shots, default=0) >= 0, f"eval.mmlu_shots and eval.word_shots must be >= 0, got {shots}"),
            ]
        )


@dataclass
class LadderTrainConfig(TrainConfig):
    """The loop's config with the ladder's defaults: windows as long as the models' block_size, so
    the few-shot prompts the ladder evaluates sit at positions the models were trained on (a model
    trained on 256-token windows loses 2.4 nats/token past position 384, against 0.8 before 256:
    docs/scaling.md), in 16 windows a step: the 8,192 tokens of the loop's 32 x 256."""

    batch_size: int = 16
    seq_len: int = 512


@dataclass
class LadderConfig:
    sizes: SizesConfig = field(default_factory=SizesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LadderTrainConfig = field(default_factory=LadderTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        raise_first(
            [
                (
                    self.train.eval_batches >= 1,
                    "train.eval_batches must be at least 1: the ladder fits the validation loss of every run",
                ),
                (
                    self.train.seq_len <= self.sizes.block_size,
                    f"train.seq_len {self.train.seq_len} is longer than sizes.block_size {self.sizes.block_size}; "
                    "raise sizes.block_size or lower train.seq_len",
                ),
            ]
        )


def raise_first(checks: list[tuple[bool, str]]) -> None:
    """A config section's checks: (holds, the one-line message naming the key and its range)."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


# Presets are overrides on the defaults above; a --config file and --set come on top of them.
PRESETS: dict[str, dict] = {
    "quick": {
        "sizes": {"depths": [1, 2, 3]},
        "data": {"world_preset": "quick"},
        "eval": {"limit": 30, "word_shots": [0, 1, 4], "arith_tasks": ["add_2", "sub_2"]},
    },
    "default": {},
    "gpu": {
        "sizes": {
            "depths": [4, 6, 8, 10, 12],
            "aspect": 64,
            "head_dim": 64,
            "block_size": 1024,
            "tokens_per_param": 20.0,
        },
        "data": {"world_preset": "large"},
        # Trained on whole 1024-token windows, so that 5-shot world_mmlu (about 900 tokens) fits.
        "train": {"batch_size": 32, "seq_len": 1024, "lr": 2e-3, "save_every": 500, "compile": True},
        "eval": {"limit": 200, "arith_tasks": [], "mmlu_shots": [0, 5]},
    },
}


def load_config(preset: str, config_path: str | None, overrides: list[str]) -> LadderConfig:
    if preset not in PRESETS:
        raise UserError(f"unknown ladder preset {preset!r}; choose one of {', '.join(PRESETS)}")
    raw = read_raw(config_path)
    merged = _merge(copy.deepcopy(PRESETS[preset]), raw)
    return build(LadderConfig, apply_overrides(merged, overrides))


def _merge(base: dict, top: dict) -> dict:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


# ---------------------------------------------------------------------------------------------
# Data


def ensure_data(cfg: DataConfig, out: Path) -> tuple[Path, Path]:
    """The world folder and the shards folder, made in OUT when the config names none."""
    world = Path(cfg.world) if cfg.world else out / "world"
    if not (world / "world.json").is_file():
        if cfg.world:
            raise UserError(
                f"{world} is not a TinyWorld folder (no world.json); write one with `gptlab world --out {world}`"
            )
        print(f"== ladder: writing TinyWorld ({cfg.world_preset}) -> {world}", flush=True)
        write_world(world, seed=cfg.world_seed, preset=cfg.world_preset)
    shards = Path(cfg.shards) if cfg.shards else out / "shards"
    if not (shards / "meta.json").is_file():
        if cfg.shards:
            raise UserError(f"{shards} has no meta.json; make the shards with `gptlab prepare --out {shards}`")
        print(f"== ladder: tokenizer ({cfg.vocab_size} tokens) and shards -> {shards}", flush=True)
        tokenizer = Tokenizer.train(iter_documents(world / "corpus"), vocab_size=cfg.vocab_size)
        tokenizer.save_pretrained(out / "tokenizer")
        prepare(out / "tokenizer", world / "corpus", shards, val_fraction=0.02, overwrite=True)
    return world, shards


def arith_tasks(cfg: EvalConfig, world: Path) -> list[str]:
    if cfg.arith_tasks:
        return list(cfg.arith_tasks)
    return json.loads((world / "world.json").read_text())["benchmarks"]["arith"]


# ---------------------------------------------------------------------------------------------
# Runs


def plan(cfg: LadderConfig, vocab_size: int) -> list[dict]:
    """Size, tokens, steps and FLOPs of every run, before any is trained."""
    s, t = cfg.sizes, cfg.train
    budget = {"flops": s.flops} if s.flops is not None else {"tokens_per_param": s.tokens_per_param}
    runs = []
    for depth in sorted(s.depths):
        try:
            model = scaling.ladder_config(
                depth,
                vocab_size=vocab_size,
                block_size=s.block_size,
                aspect=s.aspect,
                head_dim=s.head_dim,
                family=s.family,
            )
            tokens = scaling.tokens_for_budget(model, seq_len=t.seq_len, **budget)
        except ValueError as e:
            raise UserError(f"ladder sizes: {e}; fix the sizes.* settings") from None
        steps = max(s.min_steps, round(tokens / (t.batch_size * t.seq_len)))
        tokens = steps * t.batch_size * t.seq_len
        runs.append(
            {
                "name": f"d{depth}",
                "depth": depth,
                "model": model,
                "steps": steps,
                "tokens": tokens,
                "params": scaling.num_params(model),
                "flops": scaling.training_flops(model, tokens, t.seq_len),
            }
        )
    return runs


def run_folder(ladder_out: Path, name: str) -> RunFolder:
    """The folder of the ladder's run ``name`` (a pretraining run, plus its result.json and samples.jsonl)."""
    return RunFolder(ladder_out / "runs" / name)


def train_run(cfg: LadderConfig, run: dict, shards: Path, folder: RunFolder):
    train = dict(
        to_dict(cfg.train), max_steps=run["steps"], warmup_steps=min(cfg.train.warmup_steps, run["steps"] // 5)
    )
    pretrain_cfg = build(
        PretrainConfig, {"model": to_dict(run["model"]), "data": {"shards": str(shards)}, "train": train}
    )
    return pretrain(pretrain_cfg, folder.path, resume=bool(folder.checkpoints()))


def evaluate_run(cfg: EvalConfig, model, tokenizer, world: Path) -> tuple[dict, list[dict]]:
    """Every ability of one model: {task: {setting: metrics}} and the per-item samples."""
    backend = GptlabBackend(model, tokenizer)
    metrics: dict[str, dict] = {}
    samples: list[dict] = []

    def run(tasks: list[str], shots: list[int], cot: bool, label) -> None:
        out = evaluate(
            backend,
            tasks,
            world,
            shots=shots,
            cot=cot,
            batch_size=cfg.batch_size,
            limit=cfg.limit,
            return_samples=True,
        )
        for task, by_shots in out["results"].items():
            for k in shots:
                setting = label(k)
                metrics.setdefault(task, {})[setting] = _shot_result(by_shots, k, len(shots))
        for item in out["samples"]:
            samples.append({**item, "setting": label(item["shots"])})

    run(["world_mmlu"], cfg.mmlu_shots, False, lambda k: f"{k}-shot")
    run([f"words_{t}" for t in cfg.word_tasks], cfg.word_shots, False, lambda k: f"{k}-shot")
    tasks = [f"arith_{t}" for t in arith_tasks(cfg, world)]
    run(tasks, [0], False, lambda k: "standard")
    run(tasks, [0], True, lambda k: "cot")
    return metrics, samples


def _shot_result(by_shots: dict, k: int, n_shot_counts: int) -> dict:
    return by_shots[f"{k}-shot"] if n_shot_counts > 1 else by_shots


def check_tasks(cfg: EvalConfig, world: Path) -> None:
    """Load every task and check every shot count before any model trains."""
    for names, shots, cot in (
        (["world_mmlu"], cfg.mmlu_shots, False),
        ([f"words_{t}" for t in cfg.word_tasks], cfg.word_shots, False),
        ([f"arith_{t}" for t in arith_tasks(cfg, world)], [0], True),
    ):
        if len(set(shots)) != len(shots):
            raise UserError(f"shot counts {shots} repeat a value; list each once")
        for name in names:
            task = load_task(name, world, cot=cot, limit=cfg.limit, need_shots=max(shots) > 0)
            for k in shots:
                task.check_shots(k)


def mmlu_request_lengths(cfg: EvalConfig, world: Path, tokenizer: Tokenizer) -> dict[int, int]:
    """The longest world_mmlu scoring request at each of ``eval.mmlu_shots``, in the tokens the model
    reads (context and answer, less the answer's last token: what lm-eval cuts to fit the window),
    over the questions the ladder asks."""
    task = load_task("world_mmlu", world, limit=cfg.limit, need_shots=max(cfg.mmlu_shots) > 0)
    longest = {}
    for k in cfg.mmlu_shots:
        texts = [
            task.context(doc, task.shots(doc, k, seed=0)) + task.target_delimiter + choice
            for doc in task.docs
            for choice in task.choices(doc.data)
        ]
        longest[k] = max(len(ids) for ids in tokenizer.encode_batch(texts)) - 1
    return longest


def check_mmlu_window(cfg: LadderConfig, world: Path, tokenizer: Tokenizer) -> dict:
    """The longest world_mmlu request per shot count, measured before any model trains. A shot count
    whose requests would be cut to fit the window (sizes.block_size) is refused: a prompt cut from
    the left loses its first examples and its header, so its accuracy measures something else. A
    request longer than the training windows (train.seq_len) gets a warning: the models never
    learned those positions."""
    window, trained = cfg.sizes.block_size, cfg.train.seq_len
    if not cfg.eval.mmlu_shots:
        return {}
    longest = mmlu_request_lengths(cfg.eval, world, tokenizer)
    cut = sorted(k for k, n in longest.items() if n > window)
    if cut:
        fits = [k for k, n in longest.items() if n <= window]
        fewer = f"ask eval.mmlu_shots of at most {max(fits)}, or " if fits else ""
        raise UserError(
            f"world_mmlu's {cut[0]}-shot requests reach {longest[cut[0]]} tokens, longer than the models' "
            f"{window}-token window (sizes.block_size), so they would be cut from the left; {fewer}raise "
            f"sizes.block_size and train.seq_len to {longest[cut[0]]} or more"
        )
    if max(longest.values()) > trained:
        print(
            f"gptlab: warning: world_mmlu requests reach {max(longest.values())} tokens, longer than the "
            f"{trained}-token windows the models train on (train.seq_len): positions past {trained} are untrained",
            file=sys.stderr,
        )
    return {"window": window, "trained": trained, "longest": {f"{k}-shot": n for k, n in longest.items()}}


VAL_WINDOWS = 64  # validation windows the next-token claim is measured on, spread over the val split


def next_token_losses(model: GPT, shards: Path, seq_len: int, seed: int) -> dict:
    """Pretraining as next-token prediction on every token, on VAL_WINDOWS val windows: how many
    positions carry a loss (a target the loss counts), and each window's mean loss under the
    trained model and under the same model before training (initialised with the run's seed)."""
    loader = TokenLoader(shards, split="val", seq_len=seq_len, batch_size=1)
    windows = list(loader.val_batches(VAL_WINDOWS))
    x, y = (torch.cat(parts) for parts in zip(*windows))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        untrained = GPT(model.config).to(next(model.parameters()).device).eval()
    kept = y != IGNORE

    def window_losses(m: GPT) -> list[float]:
        device = next(m.parameters()).device
        losses = []
        for rows in range(0, len(x), 8):  # a few windows at a time: the logits of all of them may not fit
            logprobs = token_logprobs(m(x[rows : rows + 8].to(device)), y[rows : rows + 8].to(device)).cpu()
            losses += (-logprobs.sum(-1) / kept[rows : rows + 8].sum(-1)).tolist()
        return [round(value, 5) for value in losses]

    with torch.no_grad():
        return {
            "positions": y.numel(),
            "with_loss": int(kept.sum()),
            "untrained": window_losses(untrained),
            "trained": window_losses(model),
        }


def run_ladder(cfg: LadderConfig, out: Path, preset: str = "custom") -> dict:
    plan(cfg, cfg.data.vocab_size)  # refuse bad sizes before minutes of data preparation
    out.mkdir(parents=True, exist_ok=True)
    world, shards = ensure_data(cfg.data, out)
    check_tasks(cfg.eval, world)
    mmlu_requests = check_mmlu_window(cfg, world, Tokenizer.from_pretrained(shards / "tokenizer"))
    meta = read_meta(shards)
    runs = plan(cfg, meta["vocab_size"])
    kept = {}
    for run in runs:
        result_path = run_folder(out, run["name"]).path / "result.json"
        if result_path.is_file():
            kept[run["name"]] = json.loads(result_path.read_text())
            if kept[run["name"]].get("plan") != _signature(cfg, run):
                raise UserError(
                    f"{result_path.parent} was trained or evaluated with other settings than this ladder's; "
                    "use a new --out, or delete that run to redo it"
                )
    RunFolder(out).write_record("ladder", to_dict(cfg), preset=preset, seed=cfg.train.seed)
    print(
        "== ladder: " + ", ".join(f"{r['name']} {r['params']:,} params x {r['tokens']:,} tokens" for r in runs),
        flush=True,
    )
    results = []
    for run in runs:
        if run["name"] in kept:
            print(f"== ladder: {run['name']} done before; kept", flush=True)
            results.append(kept[run["name"]])
            continue
        folder = run_folder(out, run["name"])
        print(f"== ladder: {run['name']}: training {run['steps']} steps", flush=True)
        started = time.perf_counter()
        model = train_run(cfg, run, shards, folder)
        trained = time.perf_counter() - started
        model.eval()
        tokenizer = Tokenizer.from_pretrained(folder.model_dir)
        print(f"== ladder: {run['name']}: evaluating", flush=True)
        with torch.no_grad(), warnings_as_lines():
            metrics, samples = evaluate_run(cfg.eval, model, tokenizer, world)
        next_token = next_token_losses(model, shards, cfg.train.seq_len, cfg.train.seed)
        write_text_atomic(folder.path / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        records = folder.read_metrics()
        val_loss = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
        if val_loss is None:
            raise UserError(
                f"{run['name']} has no validation loss: the shards' val split is smaller than one batch of "
                f"train.seq_len; prepare the shards with a larger --val-fraction"
            )
        result = {
            "name": run["name"],
            "depth": run["depth"],
            "params": run["params"],
            "non_embedding_params": scaling.num_params(run["model"], non_embedding=True),
            "flops": run["flops"],
            "tokens": run["tokens"],
            "steps": run["steps"],
            "val_loss": val_loss,
            "train_seconds": round(trained, 1),
            "eval_seconds": round(time.perf_counter() - started - trained, 1),
            "model": to_dict(run["model"]),
            "metrics": metrics,
            "next_token": next_token,
            "plan": _signature(cfg, run),
        }
        write_json_atomic(folder.path / "result.json", result)
        results.append(result)
    ladder = {
        "preset": preset,
        "world": str(world),
        "mmlu_requests": mmlu_requests,
        "runs": results,
        "fit": fits(results),
    }
    write_json_atomic(out / "ladder.json", ladder)
    return ladder


def _signature(cfg: LadderConfig, run: dict) -> dict:
    """What a kept run must share with the ladder asking for it: its model, steps, training and evaluation."""
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in ("save_every", "log_every", "keep_checkpoints")}
    return {"model": to_dict(run["model"]), "steps": run["steps"], "train": train, "eval": to_dict(cfg.eval)}


def fits(runs: list[dict]) -> dict:
    compute = [r["flops"] for r in runs]
    loss = [r["val_loss"] for r in runs]
    result: dict = {"monotone": scaling.monotone_decreasing(loss)}
    power = scaling.fit_power_law(compute, loss)
    result["power_law"] = (
        power.as_dict() if power else {"unsupported": scaling.power_law_unsupported_reason(compute, loss)}
    )
    chinchilla = scaling.fit_chinchilla([r["params"] for r in runs], [r["tokens"] for r in runs], loss)
    result["chinchilla"] = (
        chinchilla.as_dict()
        if chinchilla
        else {
            "unsupported": scaling.chinchilla_unsupported_reason(
                [r["params"] for r in runs], [r["tokens"] for r in runs]
            )
        }
    )
    return result
