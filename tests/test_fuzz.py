"""Fuzz: every command with bad arguments and bad files ends with exit code 0 or 2 and, for 2, one
error line last on stderr: never a traceback. Then property-based tests (hypothesis) of the config
parser and the text readers: any input either works or is refused with one UserError line.

The commands run in this process through ``gptlab.cli.main`` (a subprocess per case would import
torch again each time); an exception escaping ``main`` is exactly what a user would see as a
traceback. The inputs are tiny: a two-layer model, a tiny world, configs of one or two steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import resource
import shutil
import signal
import sys
import types
import typing
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.align.dpo import DpoConfig
from gptlab.align.reward import RewardConfig
from gptlab.align.sft import SftConfig
from gptlab.cli import main
from gptlab.config import all_keys, apply_overrides, build, read_raw
from gptlab.data import iter_documents, prepare
from gptlab.data.chat import load_chat_data
from gptlab.data.documents import jsonl_records
from gptlab.data.prefs import load_pref_data
from gptlab.errors import UserError
from gptlab.ladder import LadderConfig
from gptlab.model import GPT, ModelConfig, RewardModel
from gptlab.pretrain import PretrainConfig
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import TrainConfig, build_optimizer, learning_rate
from gptlab.world import write_world
from helpers import TINY_WORLD, WORDS, write_jsonl

pytestmark = pytest.mark.usefixtures("on_one_thread")  # conftest: tiny models run fastest on one thread

CASE_SECONDS = 60  # a hang guard, not a speed test: cases take 0.1-3 s, one that loops on a bad value would not end
CASE_MEMORY = 4 << 30  # bytes of address space a case may add: more is a bad size that was accepted


class RanTooLong(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` in gptlab swallows it."""


@contextmanager
def time_limit(seconds: int):
    def ring(signum, frame):
        raise RanTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def memory_limit(extra: int):
    """Cap this process's address space at its current size plus ``extra`` bytes (Linux), so a huge
    size that gets through fails its allocation instead of exhausting the test machine. Not with CUDA,
    whose start-up reserves tens of gigabytes of address space."""
    statm = Path("/proc/self/statm")
    if not statm.exists() or torch.cuda.is_available():
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(statm.read_text().split()[0]) * resource.getpagesize()
    cap = used + extra if hard == resource.RLIM_INFINITY else min(used + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ----------------------------------------------------------------------------- the inputs

BINARY = random.Random(0).randbytes(600) + bytes(range(256))  # invalid UTF-8 and NUL bytes
LATIN1 = "café crème, naïve\n".encode("latin-1")


def write_bad_files(bad: Path) -> None:
    """Files every command gets in place of a good one."""
    bad.mkdir()
    (bad / "folder").mkdir()
    files = {
        "empty": b"",
        "binary": BINARY,
        "latin1.txt": LATIN1,
        "latin1.jsonl": b'{"text": "caf\xe9", "messages": [{"role": "user", "content": "caf\xe9"}]}\n',
        "truncated.jsonl": b'{"text": "alpha beta", "messages": [{"role": "us',
        "list.jsonl": b"[1, 2, 3]\n",
        "numbers.jsonl": b'{"text": 5, "messages": 5, "prompt": 5, "chosen": 5, "rejected": 5}\n',
        "bad_messages.jsonl": b'{"messages": [{"role": "user"}, 7, {"role": "wizard", "content": "x"}]}\n',
        "nan.jsonl": b'{"text": NaN, "prompt": "alpha", "chosen": " beta", "rejected": " gamma", "margin": NaN}\n',
        "huge.jsonl": b'{"text": "a", "prompt": "alpha", "chosen": " beta", "rejected": " gamma", "margin": 1e999}\n',
        "toml_shape.toml": b"model = 3\ntrain = [1, 2]\n",
        "toml_latin1.toml": b'[train]\ndevice = "caf\xe9"\n',
        "list.json": b"[1, 2, 3]\n",
        "task.toml": BINARY,
        "syntax.py": b"def reward(prompts, completions:\n",
        "raises.py": b"def reward(prompts, completions, **kwargs):\n    raise RuntimeError('no reward today')\n",
    }
    for name, data in files.items():
        (bad / name).write_bytes(data)


def write_data(root: Path) -> None:
    """Good chat, preference and text files (small, in the tiny model's words)."""
    rng = random.Random(0)
    write_jsonl(
        root / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": " ".join(rng.choices(WORDS, k=5))},
                    {"role": "assistant", "content": w},
                ]
            }
            for w in WORDS
        ],
    )
    write_jsonl(
        root / "prefs.jsonl",
        [{"prompt": f"{a} {b}", "chosen": f" {a}", "rejected": f" {b}"} for a, b in zip(WORDS, reversed(WORDS))],
    )
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choices(WORDS, k=30)) for _ in range(60)) + "\n")


def copy_with(folder: Path, target: Path, files: dict[str, bytes | None]) -> Path:
    """A copy of ``folder`` with some files replaced (or removed, for None)."""
    shutil.copytree(folder, target)
    for name, data in files.items():
        path = target / name
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
    return target


def broken_models(model: Path, root: Path) -> dict[str, Path]:
    config = json.loads((model / "config.json").read_text())
    weights = (model / "model.safetensors").read_bytes()
    changed = {
        "nan": {**config, "hidden_size": float("nan")},
        "huge": {**config, "num_hidden_layers": 10**30},
        "negative": {**config, "num_attention_heads": -2},
        "no_vocab": {k: v for k, v in config.items() if k != "vocab_size"},
    }
    models = {
        "model_config_empty": {"config.json": b""},
        "model_config_binary": {"config.json": BINARY},
        "model_config_list": {"config.json": b"[1, 2]"},
        "model_weights_truncated": {"model.safetensors": weights[: len(weights) // 2]},
        "model_weights_binary": {"model.safetensors": BINARY},
        "model_weights_missing": {"model.safetensors": None},
        "model_tokenizer_binary": {"tokenizer.json": BINARY},
        "model_tokenizer_latin1": {"tokenizer.json": LATIN1},
        "model_tokenizer_list": {"tokenizer.json": b"[]"},
        "model_tokenizer_config_binary": {"tokenizer_config.json": BINARY},
        "model_generation_binary": {"generation_config.json": BINARY},
        **{f"model_config_{k}": {"config.json": json.dumps(v).encode()} for k, v in changed.items()},
    }
    return {name: copy_with(model, root / name, files) for name, files in models.items()}


def write_configs(paths: dict[str, str], root: Path) -> None:
    """Each training stage's config for one or two steps of the tiny model on the test data."""
    train = "max_steps = 2\nbatch_size = 2\nseq_len = 32\nwarmup_steps = 1\neval_every = 0\nsave_every = 0\n"
    model = "n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 32\n"
    configs = {
        "pretrain": f'[model]\n{model}[data]\nshards = "{paths["shards"]}"\n',
        "sft": f'init = "{paths["model"]}"\n[data]\ntrain = "{paths["chat"]}"\n',
        "reward": f'init = "{paths["model"]}"\n[data]\ntrain = "{paths["prefs"]}"\n',
        "dpo": f'init = "{paths["model"]}"\n[data]\ntrain = "{paths["prefs"]}"\n',
        "ppo": (
            f'init = "{paths["model"]}"\nreward_model = "{paths["reward_model"]}"\nmax_new_tokens = 4\nppo_epochs = 1\n'
            f'[data]\nprompts = "{paths["chat"]}"\n'
        ),
        "grpo": (
            f'init = "{paths["model"]}"\nnum_generations = 2\nmax_new_tokens = 4\n[data]\nprompts = "{paths["chat"]}"\n'
        ),
    }
    for stage, text in configs.items():
        (root / f"{stage}.toml").write_text(f'{text}[train]\n{train}device = "cpu"\n')
        paths[f"{stage}_toml"] = str(root / f"{stage}.toml")


def broken_shards(shards: Path, root: Path) -> dict[str, Path]:
    shard = next(p.name for p in shards.iterdir() if p.suffix == ".bin")
    variants = {
        "shards_meta_binary": {"meta.json": BINARY},
        "shards_meta_list": {"meta.json": b"[]"},
        "shards_truncated": {shard: (shards / shard).read_bytes()[:37]},
    }
    return {name: copy_with(shards, root / name, files) for name, files in variants.items()}


def broken_runs(run: Path, root: Path) -> dict[str, Path]:
    """Copies of a finished pretraining run with one file spoiled; a ladder folder with a bad ladder.json."""
    step = next((run / "checkpoints").iterdir()).name
    state = next((run / "checkpoints" / step).rglob("*.pt")).relative_to(run)
    record = json.loads((run / "run.json").read_text())
    metrics = (run / "metrics.jsonl").read_bytes()
    variants = {
        "run_json_empty": {"run.json": b""},
        "run_json_binary": {"run.json": BINARY},
        "run_json_list": {"run.json": b"[1]"},
        "run_json_nan": {"run.json": b'{"kind": NaN, "config": NaN}'},
        "run_json_kind_nope": {"run.json": json.dumps({**record, "kind": "nope"}).encode()},
        "run_metrics_binary": {"metrics.jsonl": BINARY},
        "run_metrics_latin1": {"metrics.jsonl": metrics + LATIN1},
        "run_metrics_truncated": {"metrics.jsonl": metrics[: len(metrics) // 2]},
        "run_metrics_list": {"metrics.jsonl": b"[1, 2]\n"},
        "run_metrics_empty": {"metrics.jsonl": b""},
        "run_trainer_state_binary": {str(state): BINARY},
        "run_weights_truncated": {f"checkpoints/{step}/model.safetensors": b"\x10\x00"},
    }
    runs = {name: copy_with(run, root / name, files) for name, files in variants.items()}
    runs["run_model_missing"] = copy_with(run, root / "run_model_missing", {})
    shutil.rmtree(runs["run_model_missing"] / "model")
    ladder = {"kind": "ladder", "config": {}}
    for name, text in {
        "ladder_json_binary": BINARY,
        "ladder_json_list": b"[1, 2]",
        "ladder_json_empty_runs": b'{"runs": [], "fit": {}}',
    }.items():
        (root / name).mkdir()
        (root / name / "run.json").write_text(json.dumps(ladder))
        (root / name / "ladder.json").write_bytes(text)
        runs[name] = root / name
    return runs


def mmlu_folders(world: Path, root: Path) -> dict[str, Path]:
    """MMLU folders in the original layout with one spoiled test file."""
    mmlu = world / "bench" / "world_mmlu"
    test = next((mmlu / "test").iterdir()).name
    variants = {
        "mmlu_latin1": {f"test/{test}": b"caf\xe9,a,b,c,d,A\n"},
        "mmlu_short_rows": {f"test/{test}": b"question,A,B\n"},
        "mmlu_empty_test": {f"test/{test}": b""},
        "mmlu_bad_answer": {f"test/{test}": b"question,a,b,c,d,Z\n"},
        "mmlu_binary": {f"test/{test}": BINARY},
    }
    return {name: copy_with(mmlu, root / name, files) for name, files in variants.items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    write_bad_files(root / "bad")
    write_data(root)
    write_world(root / "world", seed=0, preset=TINY_WORLD)
    prepare(tiny_model, [root / "corpus.txt"], root / "shards", val_fraction=0.1, workers=1)
    paths = {p.name.replace(".", "_"): str(p) for p in (root / "bad").iterdir()}
    paths |= {
        "model": str(tiny_model),
        "world": str(root / "world"),
        "shards": str(root / "shards"),
        "chat": str(root / "chat.jsonl"),
        "prefs": str(root / "prefs.jsonl"),
        "corpus": str(root / "corpus.txt"),
        "missing": str(root / "bad" / "missing"),
        "missing_toml": str(root / "bad" / "missing.toml"),
        "run": str(root / "run"),
        "reward_model": str(root / "reward_model"),
    }
    tokenizer = Tokenizer.from_pretrained(tiny_model)
    RewardModel.from_causal_lm(tiny_model).save_pretrained(paths["reward_model"], tokenizer=tokenizer)
    write_configs(paths, root)
    assert main(["pretrain", "--config", paths["pretrain_toml"], "--out", paths["run"]]) == 0
    for made in (
        broken_models(tiny_model, root),
        broken_shards(root / "shards", root),
        broken_runs(root / "run", root),
        mmlu_folders(root / "world", root),
    ):
        paths |= {name: str(path) for name, path in made.items()}
    return paths


# ----------------------------------------------------------------------------- the table

HUGE = str(10**30)
LATIN1_ARG = LATIN1.decode("utf-8", "surrogateescape").strip()  # how Python hands non-UTF-8 argv bytes to main


def c(command: str, *args: str, stdin: bytes | None = None, id: str, marks=()):
    """One case: ``command`` split at spaces, then ``args`` as they are (``{name}`` stands for an input's
    path in both), what is piped to it, and its name."""
    return pytest.param((*command.split(), *args), stdin, id=id.replace(HUGE, "huge"), marks=marks)


COMMON_FILES = [
    *("empty", "binary", "latin1_txt", "latin1_jsonl", "truncated_jsonl", "list_jsonl", "numbers_jsonl"),
    *("nan_jsonl", "huge_jsonl", "folder", "missing"),
]

BAD_TRAIN_SETTINGS = [
    *("train.lr=nan", "train.lr=-1", "train.lr=inf", "train.min_lr=nan", "train.grad_clip=nan", "train.grad_clip=-1"),
    *("train.max_steps=-1", "train.max_steps=nan", "train.batch_size=0", f"train.batch_size={HUGE}"),
    *(
        f"train.seq_len={HUGE}",
        "train.seq_len=-5",
        "train.warmup_steps=nan",
        "train.weight_decay=nan",
        "train.beta1=nan",
    ),
    *("train.beta2=2", "train.device=cuda:99", "train.device=nope", "train.dtype=fp8", "train.micro_batch_size=0"),
    *("train.micro_batch_size=3", "train.eval_every=-1", "train.save_every=-1", f"train.seed={HUGE}", "train.seed=-1"),
    *("train.lr=[1, 2]", "train.lr=", "train=3", "train.lr.x=1", "nope=1", "=1", "train.lr", "train.compile=maybe"),
]
BAD_MODEL_SETTINGS = [
    *("model.n_embd=nan", f"model.n_embd={HUGE}", "model.n_head=0", "model.n_head=3", "model.block_size=-1"),
    *(f"model.block_size={HUGE}", f"model.vocab_size={HUGE}", "model.vocab_size=5", "model.dropout=nan"),
    *("model.rope_theta=nan", "model.rope_theta=-1", "model.norm_eps=nan", "model.family=gpt3", "model.n_kv_head=0"),
    *(f"model.intermediate_size={HUGE}", "model.intermediate_size=-1"),
]
BROKEN_MODELS = [
    *("model_config_empty", "model_config_binary", "model_config_list", "model_config_nan", "model_config_huge"),
    *("model_config_negative", "model_config_no_vocab", "model_weights_truncated", "model_weights_binary"),
    *("model_weights_missing", "model_tokenizer_binary", "model_tokenizer_latin1", "model_tokenizer_list"),
    *("model_tokenizer_config_binary", "model_generation_binary"),
]
BAD_MODEL_FOLDERS = ["folder", "missing", "binary", *BROKEN_MODELS]
BAD_SAMPLING = {
    "--max-new-tokens": ("-1", "0", HUGE, "nan"),
    "--temperature": ("nan", "-1", "inf", HUGE),
    "--top-k": ("0", "-1", HUGE),
    "--top-p": ("nan", "0", "-0.5", "2"),
    "--repetition-penalty": ("nan", "-1", "inf"),
    "--seed": ("-1", HUGE),
}
BAD_STDIN = {
    "binary": BINARY + b"\n",
    "latin1": LATIN1,
    "empty": b"",
    "long": b"alpha " * 2000 + b"\n",
    "nul": b"alpha\x00beta\n",
}
LADDER_SETTINGS = [
    *("sizes.depths=[]", "sizes.depths=[0]", "sizes.depths=nan", "sizes.aspect=-1", "sizes.head_dim=0"),
    *("sizes.tokens_per_param=nan", "sizes.tokens_per_param=-1", "sizes.flops=nan", "sizes.block_size=0"),
    *("data.vocab_size=3", "eval.limit=-1", "eval.batch_size=0", "eval.word_shots=[-1]"),
    *("eval.word_tasks=['nope']", "eval.arith_tasks=['nope']", "data.shards={binary}", "data.world={binary}"),
    *("train.lr=nan", "train.batch_size=0"),
]
BAD_EVAL = {
    "--shots": ("nan", "-1", HUGE, "", "1,,2"),
    "--batch-size": ("0", "-1", HUGE),
    "--limit": ("-1", "0", HUGE),
    "--seed": ("-1", HUGE),
    "--device": ("nope", "cuda:99", "meta"),
    "--backend": ("hf", "nope"),
}
BAD_RUNS = [
    *("run_json_empty", "run_json_binary", "run_json_list", "run_json_nan", "run_json_kind_nope"),
    *("run_metrics_binary", "run_metrics_latin1", "run_metrics_truncated", "run_metrics_list", "run_metrics_empty"),
    *("run_model_missing", "ladder_json_binary", "ladder_json_list", "ladder_json_empty_runs"),
]
MMLU_FOLDERS = ["mmlu_latin1", "mmlu_short_rows", "mmlu_empty_test", "mmlu_bad_answer", "mmlu_binary"]

STAGE = "{stage} --config {{{stage}_toml}} --out {{out}}"  # a training stage on its tiny config
TRAINING_STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")
BAD_PPO_SETTINGS = [
    *("kl_estimator=k2", "kl_coef=nan", "kl_coef=-1", "cliprange=nan", "cliprange=1", "cliprange_value=0"),
    *("gamma=2", "lam=nan", "vf_coef=inf", "missing_eos_penalty=nan", "ppo_epochs=0", "num_mini_batches=0"),
    *("ppo_epochs=3", "max_new_tokens=0", "max_new_tokens=32", "temperature=0", "top_p=nan", "value_model={binary}"),
    *("ref={folder}", "train.parallelism=fsdp"),
]
BAD_GRPO_SETTINGS = [
    *("num_generations=1", "num_generations=0", "reward=[]", "reward=nope", "reward={binary}", "reward={model}"),
    *(
        "reward={missing}.py:reward",
        "reward={syntax_py}:reward",
        "reward={raises_py}:reward",
        "reward={raises_py}:nope",
    ),
    *("reward=oracle", "reward_weights=[1, 2]", "reward_weights=[nan]", "loss_type=nope"),
    *("scale_rewards=nope", "beta=nan", "beta=-1", "epsilon=2", "epsilon_high=-1", "num_iterations=0"),
    *("steps_per_generation=0", "max_new_tokens=0", "temperature=nan", "data.families=[]", "data.max_prompt_length=0"),
    *("train.batch_size=3", "ref={folder}", "train.parallelism=fsdp"),
]
SAMPLE = "sample --model {model} --prompt alpha --max-new-tokens 4"
EVAL = "eval --model {model} --tasks arith_add_2 --data {world} --limit 2"

CASES = [
    # world
    c("world --out {empty}", id="world-out-is-a-file"),
    c("world --out {folder} --preset nope", id="world-bad-preset"),
    c("world --out {out} --seed nan", id="world-seed-nan"),
    c("world --out {out} --preset nope --seed", HUGE, id="world-seed-huge"),
    c("world --out {binary}/w", id="world-out-under-a-file"),
    c("world --out {world}/corpus", id="world-out-non-empty"),
    # tokenizer and prepare
    *(c(f"tokenizer --input {{{f}}} --out {{out}} --vocab-size 300", id=f"tokenizer-{f}") for f in COMMON_FILES),
    *(
        c("tokenizer --input {corpus} --out {out} --vocab-size", v, id=f"tokenizer-vocab-{v}")
        for v in ("-1", "0", "nan", HUGE)
    ),
    c("tokenizer --input {corpus} --out {binary}", id="tokenizer-out-is-a-file"),
    c("tokenizer --input hf: --out {out}", id="tokenizer-hf-empty-name"),
    *(c(f"prepare --tokenizer {{model}} --input {{{f}}} --out {{out}}", id=f"prepare-{f}") for f in COMMON_FILES),
    *(
        c(f"prepare --tokenizer {{{m}}} --input {{corpus}} --out {{out}}", id=f"prepare-tokenizer-{m}")
        for m in (
            "folder",
            "missing",
            "binary",
            "model_tokenizer_binary",
            "model_tokenizer_latin1",
            "model_tokenizer_list",
        )
    ),
    *(
        c(f"prepare --tokenizer {{model}} --input {{corpus}} --out {{out}} {flag}", v, id=f"prepare{flag}-{v}")
        for flag, values in {
            "--val-fraction": ("nan", "-1", "2", "inf", "1", "0"),
            "--workers": ("0", "-3", HUGE),
        }.items()
        for v in values
    ),
    c("prepare --tokenizer {model} --input {corpus} --out {binary}", id="prepare-out-is-a-file"),
    # the training commands: bad config files, bad --set values, bad data and model folders
    *(
        c(f"{stage} --config {{{f}}} --out {{out}}", id=f"{stage}-config-{f}")
        for stage in TRAINING_STAGES
        for f in ("empty", "binary", "toml_latin1_toml", "toml_shape_toml", "list_json", "folder", "missing")
    ),
    *(
        c(STAGE.format(stage=stage), "--set", item, id=f"{stage}-set-{item}")
        for stage in TRAINING_STAGES
        for item in BAD_TRAIN_SETTINGS
    ),
    *(c(STAGE.format(stage="pretrain"), "--set", item, id=f"pretrain-set-{item}") for item in BAD_MODEL_SETTINGS),
    *(
        c(STAGE.format(stage="pretrain"), "--set", f"data.shards={{{f}}}", id=f"pretrain-shards-{f}")
        for f in ("folder", "missing", "binary", "shards_meta_binary", "shards_meta_list", "shards_truncated", "model")
    ),
    c(STAGE.format(stage="pretrain"), "--resume", "--overwrite", id="pretrain-resume-and-overwrite"),
    c("pretrain --config {pretrain_toml} --out {binary}", id="pretrain-out-is-a-file"),
    *(
        c(f"pretrain --out {{{run}}} --resume", id=f"pretrain-resume-{run}")
        for run in ("run_json_binary", "run_json_list", "run_trainer_state_binary", "run_weights_truncated")
    ),
    *(
        c(STAGE.format(stage=stage), "--set", f"data.train={{{f}}}", id=f"{stage}-data-{f}")
        for stage in ("sft", "reward", "dpo")
        for f in (*COMMON_FILES, "bad_messages_jsonl")
    ),
    *(
        c(STAGE.format(stage=stage), "--set", f"init={{{m}}}", id=f"{stage}-init-{m}")
        for stage in ("sft", "reward", "dpo", "ppo", "grpo")
        for m in BAD_MODEL_FOLDERS
    ),
    *(
        c(STAGE.format(stage=stage), "--set", f"data.prompts={{{f}}}", id=f"{stage}-prompts-{f}")
        for stage in ("ppo", "grpo")
        for f in (*COMMON_FILES, "bad_messages_jsonl")
    ),
    *(
        c(STAGE.format(stage="ppo"), "--set", f"reward_model={{{m}}}", id=f"ppo-reward-model-{m}")
        for m in (*BAD_MODEL_FOLDERS, "model")
    ),
    *(c(STAGE.format(stage="ppo"), "--set", item, id=f"ppo-set-{item}") for item in BAD_PPO_SETTINGS),
    *(c(STAGE.format(stage="grpo"), "--set", item, id=f"grpo-set-{item}") for item in BAD_GRPO_SETTINGS),
    *(
        c(STAGE.format(stage="dpo"), "--set", item, id=f"dpo-set-{item}")
        for item in ("beta=nan", "beta=-1", "beta=inf", "label_smoothing=nan", "loss_type=nope", "ref={binary}")
    ),
    c(STAGE.format(stage="reward"), "--set", "center_rewards_coefficient=nan", id="reward-center-nan"),
    # sample and chat (gptlab reads no generation_config.json: the one model that loads here would otherwise write
    # its whole window)
    *(
        c(f"sample --model {{{m}}} --prompt alpha --max-new-tokens 2", id=f"sample-model-{m}")
        for m in BAD_MODEL_FOLDERS
    ),
    *(c(SAMPLE, flag, value, id=f"sample{flag}-{value}") for flag, values in BAD_SAMPLING.items() for value in values),
    c("sample --model {model} --max-new-tokens 2 --prompt", LATIN1_ARG, id="sample-prompt-latin1"),
    c("sample --model {model} --max-new-tokens 2 --prompt", "", id="sample-prompt-empty"),
    c(SAMPLE, "--stop", "", id="sample-stop-empty"),
    c(SAMPLE, "--stop", LATIN1_ARG, id="sample-stop-latin1"),
    c("sample --model {model} --prompt", "alpha " * 500, id="sample-prompt-too-long"),
    *(
        c("chat --model {model} --max-new-tokens 2", stdin=data, id=f"chat-stdin-{name}")
        for name, data in BAD_STDIN.items()
    ),
    *(c(f"chat --model {{{m}}} --max-new-tokens 2", stdin=b"hello\n", id=f"chat-model-{m}") for m in BAD_MODEL_FOLDERS),
    c("chat --model {model} --max-new-tokens 2 --system", LATIN1_ARG, stdin=b"hi\n", id="chat-system-latin1"),
    c("chat --model {model} --system", "alpha " * 500, stdin=b"hi\n", id="chat-system-too-long"),
    *(
        c("chat --model {model}", flag, value, stdin=b"alpha\n", id=f"chat{flag}-{value}")
        for flag, values in {"--max-new-tokens": ("-1", "0", HUGE), "--temperature": ("nan", "-1", "inf")}.items()
        for value in values
    ),
    # ladder and demo: refused before any training
    c("ladder --preset nope --out {out}", id="ladder-preset-nope"),
    *(
        c(f"ladder --config {{{f}}} --out {{out}}", id=f"ladder-config-{f}")
        for f in ("binary", "toml_latin1_toml", "toml_shape_toml", "missing")
    ),
    *(
        c("ladder --out {out} --set data.world={world} --set", item, id=f"ladder-set-{item}")
        for item in LADDER_SETTINGS
    ),
    c("ladder --out {binary} --set data.world={world}", id="ladder-out-is-a-file"),
    c("ladder --out {out} --set data.world_preset=nope", id="ladder-world-preset-nope"),
    c("demo --out {binary}", id="demo-out-is-a-file"),
    c("demo --out {out} --preset nope", id="demo-preset-nope"),
    c("demo --out {out} --seed nan", id="demo-seed-nan"),
    *(c(f"demo --out {{{run}}}", id=f"demo-out-{run}") for run in ("run", "run_json_binary", "run_json_list")),
    # eval
    *(c(f"eval --model {{{m}}} --tasks ppl --data {{corpus}}", id=f"eval-model-{m}") for m in BAD_MODEL_FOLDERS),
    *(
        c(f"eval --model {{model}} --tasks {task} --data {{{f}}} --limit 2", id=f"eval-{task}-data-{f}")
        for task in ("ppl", "gsm8k", "world_mmlu", "mmlu", "arith_add_2", "words_reverse", "world_instruct")
        for f in COMMON_FILES
    ),
    *(c(f"eval --model {{model}} --tasks mmlu --data {{{m}}} --limit 2", id=f"eval-mmlu-{m}") for m in MMLU_FOLDERS),
    *(c(EVAL, flag, value, id=f"eval{flag}-{value}") for flag, values in BAD_EVAL.items() for value in values),
    *(
        c(f"eval --model {{model}} --tasks {{{f}}} --data {{world}} --limit 2", id=f"eval-task-file-{f}")
        for f in ("toml_shape_toml", "toml_latin1_toml", "task_toml", "missing_toml")
    ),
    c(EVAL, "--out", "{binary}/r.json", id="eval-out-under-a-file"),
    c(EVAL, "--samples", "{folder}", id="eval-samples-is-a-folder"),
    c(EVAL, "--backend", "openai", id="eval-openai-no-url"),
    # report
    *(c(f"report {{{f}}}", id=f"report-{f}") for f in ("folder", "missing", "binary", "world", *BAD_RUNS)),
]

# Cases test_cli runs with the same kind of input, asserting more (exit 2 and the words of the one error line):
# test_sample_errors, test_tokenizer_and_prepare_errors, test_pretrain_errors,
# test_an_output_path_that_cannot_be_written_is_one_line, test_report_writes_a_training_runs_card_from_its_records
# and test_world_and_demo_errors.
IN_TEST_CLI = {
    *("sample-model-missing", "sample-model-folder", "sample-model-model_weights_truncated"),
    *("tokenizer-missing", "prepare-binary", "prepare-tokenizer-missing"),
    *("pretrain-shards-missing", "pretrain-config-missing", "eval-out-under-a-file", "report-folder"),
    *("world-bad-preset", "world-out-non-empty", "demo-preset-nope"),
}
assert not IN_TEST_CLI - {case.id for case in CASES}, "each names a case"
CASES = [case for case in CASES if case.id not in IN_TEST_CLI]


def fill(argv: tuple[str, ...], paths: dict[str, str]) -> list[str]:
    return [arg.format_map(paths) for arg in argv]


def run_cli(argv: list[str], stdin: bytes | None, monkeypatch) -> int:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    with time_limit(CASE_SECONDS), memory_limit(CASE_MEMORY):
        try:
            return main(argv)
        except SystemExit as e:  # argparse's usage errors
            return e.code


@pytest.mark.parametrize(("argv", "stdin"), CASES)
def test_bad_input_ends_in_one_line_not_a_traceback(argv, stdin, inputs, tmp_path, monkeypatch, capfd):
    paths = {**inputs, "out": str(tmp_path / "out")}
    code = run_cli(fill(argv, paths), stdin, monkeypatch)
    err = capfd.readouterr().err
    assert code in (0, 2), (code, err[-3000:])
    assert "Traceback" not in err, err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert ": error: " in lines[-1] and sum(": error: " in line for line in lines) == 1, err


# ----------------------------------------------------------------------------- property-based: configs

CONFIGS = [PretrainConfig, SftConfig, RewardConfig, DpoConfig, LadderConfig]
# The words the configs' string keys accept, so that drawn configs get past the type checks to the value checks.
CHOICES = "cosine linear llama gpt2 auto cpu cuda fp32 bf16 ddp fsdp adamw muon sigmoid ipo hinge robust".split()
SCALARS = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(CHOICES + ["turn", "drop", "keep_end", "none", ""]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.none())
# What a user types after `--set key=`: TOML literals, bare words, and the odd non-number.
SET_VALUES = st.one_of(
    st.text(max_size=12),
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(CHOICES + ["nan", "-inf", "1e999", "[1, 2]", "[]", "true", '"x"', "{a = 1}", "[", "0x1f"]),
)


def typed_values(hint) -> st.SearchStrategy:
    """Values of a field's type, any of them: negative, zero, NaN, infinite, huge, odd strings."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(typed_values(option) for option in typing.get_args(hint)))
    if origin is list:
        return st.lists(typed_values(typing.get_args(hint)[0]), max_size=4)
    return {
        int: st.integers(-3, 100) | st.integers(min_value=-(2**70), max_value=2**70),
        float: st.floats() | st.integers(-3, 3),
        bool: st.booleans(),
        str: st.sampled_from(CHOICES) | st.text(max_size=8),
        type(None): st.none(),
    }[hint]


def leaf_hints(cls, prefix: str = "") -> dict[str, typing.Any]:
    """Every dotted key of a config dataclass with its type."""
    hints = typing.get_type_hints(cls)
    leaves = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            leaves |= leaf_hints(hints[f.name], f"{prefix}{f.name}.")
        else:
            leaves[prefix + f.name] = hints[f.name]
    return leaves


def nest(items: list[tuple[str, typing.Any]]) -> dict:
    """The nested dict of (dotted key, value) pairs; a key under a value already set is left out."""
    raw: dict = {}
    for key, value in items:
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = value
    return raw


def raw_config(cls) -> st.SearchStrategy[dict]:
    """Configs shaped like ``cls``: some of its keys with values of their types (any of them), and
    now and then one wild entry: a key it does not have, or a value of another type, or a section
    given a value."""
    leaves = leaf_hints(cls)
    typed = st.lists(st.sampled_from(sorted(leaves)), unique=True, max_size=6).flatmap(
        lambda keys: st.tuples(*(st.tuples(st.just(k), typed_values(leaves[k])) for k in keys)).map(list)
    )
    sections = sorted({key.rsplit(".", 1)[0] for key in leaves if "." in key})
    wild_key = st.one_of(st.sampled_from(sorted(leaves) + sections), st.text(max_size=8))
    wild = st.lists(st.tuples(wild_key, VALUES), max_size=1)
    return st.tuples(typed, wild).map(lambda t: nest(t[0] + t[1]))


@contextmanager
def refused_in_one_line_if_at_all():
    """The block may raise a UserError of one non-empty line; any other exception fails the test."""
    try:
        yield
    except UserError as e:
        assert str(e) and "\n" not in str(e), str(e)


def build_for_the_loop(cls, raw: dict) -> None:
    assert_the_loop_can_use(build(cls, raw).train)


OPTIMIZER_MODEL = GPT(
    ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
)  # for the optimizer's groups


def assert_the_loop_can_use(train: TrainConfig) -> None:
    """What a config that builds promises: a finite learning rate within [0, train.lr] at every step (a
    min_lr above lr would climb during the decay, a negative one would go negative), and values the
    optimizer accepts."""
    last = train.max_steps - 1
    for step in {0, min(train.warmup_steps, last), train.max_steps // 2, last}:
        lr = learning_rate(train, step)
        assert math.isfinite(lr) and 0 <= lr <= train.lr, (step, lr, train)
    build_optimizer(OPTIMIZER_MODEL, train, torch.device("cpu"))


FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda cls: cls.__name__)
@FUZZ
@given(data=st.data())
def test_any_config_table_builds_or_is_one_user_error_line(cls, data):
    with refused_in_one_line_if_at_all():
        build_for_the_loop(cls, data.draw(raw_config(cls)))


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda cls: cls.__name__)
@FUZZ
@given(data=st.data())
def test_any_set_overrides_build_or_are_one_user_error_line(cls, data):
    setting = st.tuples(st.sampled_from(all_keys(cls)), SET_VALUES).map("=".join)
    overrides = data.draw(st.lists(st.one_of(setting, st.text(max_size=20)), max_size=4))
    with refused_in_one_line_if_at_all():
        build_for_the_loop(cls, apply_overrides({}, overrides))


TOML_LINES = st.one_of(
    st.sampled_from(["[model]", "[train]", "[data]", "[sizes]", "[eval]", "[[train]]", "[model.x]", "model = 1"]),
    st.tuples(st.sampled_from(["lr", "max_steps", "n_embd", "init", "beta", "depths", "x"]), SET_VALUES).map(
        " = ".join
    ),
    st.text(max_size=20),
)
TOML_BYTES = st.one_of(
    st.lists(TOML_LINES, max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
    st.lists(TOML_LINES, max_size=6).map(lambda lines: "\n".join(lines).encode("latin-1", "replace")),
    st.binary(max_size=200),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hypothesis")


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda cls: cls.__name__)
@FUZZ
@given(content=TOML_BYTES)
def test_any_config_file_builds_or_is_one_user_error_line(cls, content, scratch):
    path = scratch / "config.toml"
    path.write_bytes(content)
    with refused_in_one_line_if_at_all():
        build_for_the_loop(cls, read_raw(path))


# ----------------------------------------------------------------------------- property-based: text readers

ROLES = st.sampled_from(["system", "user", "assistant", "tool", "", "wizard"])
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=15))
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": ROLES, "content": st.text(max_size=30)}),
    st.fixed_dictionaries({}, optional={"role": JSON_VALUES, "content": JSON_VALUES}),
    JSON_VALUES,
)
ANSWER = st.one_of(st.text(max_size=30), st.lists(MESSAGE, max_size=3), MESSAGE, JSON_VALUES)
RECORD = st.fixed_dictionaries(
    {},
    optional={
        "text": st.one_of(st.text(max_size=40), JSON_VALUES),
        "messages": st.one_of(st.lists(MESSAGE, max_size=4), JSON_VALUES),
        "prompt": ANSWER,
        "completion": ANSWER,
        "chosen": ANSWER,
        "rejected": ANSWER,
        "margin": st.one_of(st.floats(), JSON_VALUES),
    },
)
LINE = st.one_of(
    RECORD.map(json.dumps).map(str.encode),
    JSON_VALUES.map(json.dumps).map(str.encode),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=30),
)
JSONL_BYTES = st.one_of(st.lists(LINE, max_size=5).map(b"\n".join), st.binary(max_size=200))


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model)


READERS = {
    "jsonl_records": lambda path, tok: list(jsonl_records(path)),
    "iter_documents": lambda path, tok: list(iter_documents(path)),
    "load_chat_data": lambda path, tok: load_chat_data(path, tok, max_len=64),
    "load_pref_data": lambda path, tok: load_pref_data(path, tok, max_length=64),
}


@pytest.mark.parametrize("reader", READERS)
@FUZZ
@given(content=JSONL_BYTES)
def test_any_bytes_are_read_or_refused_in_one_user_error_line(reader, content, scratch, tokenizer):
    path = scratch / "records.jsonl"
    path.write_bytes(content)
    with refused_in_one_line_if_at_all():
        READERS[reader](path, tokenizer)
