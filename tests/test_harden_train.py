"""Training refuses nonsense and says what happened: config ranges for every stage, `--resume`
with nothing to resume or with another model, damaged checkpoints, and an MFU that stays <= 100%."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gptlab.train.loop as loop
from gptlab.cli import main as gptlab_main
from gptlab.config import build, read_raw
from gptlab.data import iter_documents, prepare
from gptlab.errors import UserError
from gptlab.model import GPT, ModelConfig
from gptlab.runs import RunFolder
from gptlab.tokenizer import Tokenizer
from gptlab.train import mfu
from gptlab.train.loop import Runtime, TrainConfig, Trainer
from helpers import WORDS, assert_one_line, snapshot

# ----------------------------------------------------------------------------- config ranges


def stage_configs():
    from gptlab.align.dpo import DpoConfig
    from gptlab.align.reward import RewardConfig
    from gptlab.align.sft import SftConfig
    from gptlab.ladder import LadderConfig
    from gptlab.pretrain import PretrainConfig

    return [PretrainConfig, SftConfig, RewardConfig, DpoConfig, LadderConfig]


# Each bad train.* value, and the key the refusal must name. lr defaults to 1e-3 or less in every stage.
BAD_TRAIN_VALUES = [
    ("train.min_lr=0.5", "train.min_lr"),  # above lr: the rate would climb during "decay"
    ("train.min_lr=-1e-5", "train.min_lr"),  # a negative rate trains uphill
    ("train.min_lr=nan", "train.min_lr"),
    ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.grad_clip=-1.0", "train.grad_clip"),  # silently no clipping before
    ("train.grad_clip=nan", "train.grad_clip"),
    ("train.beta1=1.0", "train.beta1"),
    ("train.beta2=nan", "train.beta2"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.weight_decay=inf", "train.weight_decay"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    (f"train.batch_size={10**30}", "train.batch_size"),  # a numpy ValueError in the loader before
    (f"train.seq_len={2**40}", "train.seq_len"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.save_every=-5", "train.save_every"),
    ("train.eval_batches=-1", "train.eval_batches"),
    ("train.seed=-1", "train.seed"),
]


@pytest.mark.parametrize("cls", stage_configs(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("override, key", BAD_TRAIN_VALUES, ids=[o for o, _ in BAD_TRAIN_VALUES])
def test_every_stage_refuses_train_values_outside_their_range(cls, override, key):
    with pytest.raises(UserError) as info:
        build(cls, read_raw(None, [override]))
    assert_one_line(info, key)


@pytest.mark.parametrize(
    "stage, override, key",
    [
        ("DpoConfig", "beta=nan", "beta"),
        ("DpoConfig", "beta=inf", "beta"),
        ("RewardConfig", "center_rewards_coefficient=-0.01", "center_rewards_coefficient"),
        ("RewardConfig", "center_rewards_coefficient=nan", "center_rewards_coefficient"),
        ("LadderConfig", "sizes.tokens_per_param=nan", "sizes.tokens_per_param"),
        ("LadderConfig", "sizes.flops=inf", "sizes.flops"),
        ("LadderConfig", "sizes.depths=[0, 1]", "sizes.depths"),
        ("LadderConfig", "sizes.min_steps=0", "sizes.min_steps"),
        ("LadderConfig", "eval.limit=0", "eval.limit"),
        ("LadderConfig", "eval.word_shots=[-1, 0]", "eval.word_shots"),
        ("LadderConfig", "data.world_seed=-3", "data.world_seed"),
        ("LadderConfig", "train.seq_len=1024", "sizes.block_size 512"),  # windows longer than the models
    ],
)
def test_stage_settings_outside_their_range_are_refused_naming_the_key(stage, override, key):
    (cls,) = [c for c in stage_configs() if c.__name__ == stage]
    with pytest.raises(UserError) as info:
        build(cls, read_raw(None, [override]))
    assert_one_line(info, key)


def test_a_warmup_longer_than_the_run_is_said(tmp_path, capsys, no_mfu):
    trainer = tiny_trainer(tmp_path, max_steps=2, warmup_steps=5)
    trainer.fit()
    assert "train.warmup_steps 5 > train.max_steps 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the tiny trainer


class Batches:
    """Random token rows; the state is a counter so a resumed run can be checked for it."""

    def __init__(self, vocab_size: int = 50):
        self.vocab_size, self.served = vocab_size, 0

    def next_batch(self):
        self.served += 1
        return torch.randint(0, self.vocab_size, (2, 8))

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.served = state["served"]


def tiny_model(n_layer: int = 1, vocab_size: int = 50) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab_size, block_size=16, n_layer=n_layer, n_head=2, n_embd=16))


def tiny_trainer(out: Path, model: GPT | None = None, tokenizer=None, **train) -> Trainer:
    settings = dict(max_steps=4, batch_size=2, seq_len=8, warmup_steps=1, eval_every=0, log_every=1, save_every=2)
    cfg = TrainConfig(**{**settings, **train})
    model = model or tiny_model()
    batches = Batches(model.config.vocab_size)
    return Trainer(
        model, cfg, Runtime(torch.device("cpu"), None), out, lambda m, b: m(b, b), batches, tokenizer=tokenizer
    )


@pytest.fixture
def no_mfu(monkeypatch):
    """No CPU peak measurement: these runs are a few milliseconds each."""
    monkeypatch.setattr(loop, "peak_flops", lambda device: None)


@pytest.fixture
def trained(tmp_path, no_mfu) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    tiny_trainer(out).run("pretrain", {})
    assert [p.name for p in RunFolder(out).checkpoints()] == ["step-0000002", "step-0000004"]
    return out


def resume(out: Path, model: GPT | None = None, tokenizer=None, **train) -> Trainer:
    trainer = tiny_trainer(out, model, tokenizer, **{"max_steps": 6, **train})
    trainer.run("pretrain", {}, resume=True)
    return trainer


# ----------------------------------------------------------------------------- --resume


@pytest.mark.parametrize("folder", ["missing", "empty", "record_only"])
def test_resume_with_no_run_to_resume_is_refused_saying_where_it_looked(tmp_path, no_mfu, folder):
    out = tmp_path / "run"
    if folder != "missing":
        out.mkdir()
    if folder == "record_only":  # killed before its first checkpoint
        RunFolder(out).write_record("pretrain", {})
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as info:
        resume(out)
    assert_one_line(info, str(out), "drop --resume")
    assert snapshot(tmp_path) == before and out.exists() == (folder != "missing")


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo"])
def test_every_stage_refuses_resume_before_reading_its_config_or_data(tmp_path, capsys, stage):
    """`--resume` into a mistyped --out used to train the built-in defaults from scratch."""
    out = tmp_path / "typo"
    code = gptlab_main([stage, "--out", str(out), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("gptlab: error: "), err
    assert "nothing to resume" in err[0] and str(out) in err[0] and "drop --resume" in err[0]
    assert not out.exists()


def test_resume_with_another_model_shape_names_the_fields_and_touches_nothing(trained):
    before = snapshot(trained)
    with pytest.raises(UserError) as info:
        resume(trained, tiny_model(n_layer=2))
    assert_one_line(info, "step-0000004", "model.n_layer 1 there, 2 here", "drop --resume")
    assert snapshot(trained) == before


def small_tokenizer(words: list[str]) -> Tokenizer:
    rng = random.Random(0)
    return Tokenizer.train([" ".join(rng.choices(words, k=12)) for _ in range(50)], vocab_size=280)


def test_resume_with_another_tokenizer_is_refused_and_touches_nothing(tmp_path, no_mfu):
    out = tmp_path / "run"
    first, other = small_tokenizer(WORDS), small_tokenizer([w[::-1] for w in WORDS])
    tiny_trainer(out, tiny_model(vocab_size=300), first).run("pretrain", {})
    before = snapshot(out)
    with pytest.raises(UserError) as info:
        resume(out, tiny_model(vocab_size=300), other)
    assert_one_line(info, "the tokenizer", "drop --resume")
    assert snapshot(out) == before
    resume(out, tiny_model(vocab_size=300), first)  # the run's own tokenizer resumes


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (root / "text.txt").write_text("\n\n".join(" ".join(rng.choices(WORDS, k=30)) for _ in range(200)) + "\n")
    Tokenizer.train(iter_documents([root / "text.txt"]), vocab_size=280).save_pretrained(root / "tok")
    prepare(root / "tok", [root / "text.txt"], root / "shards", val_fraction=0.05, workers=1)
    return root / "shards"


def test_pretrain_resume_with_a_changed_shape_is_one_line_not_a_traceback(shards, tmp_path, capsys, no_mfu):
    out = str(tmp_path / "run")
    sets = ["data.shards=" + str(shards), "model.n_layer=1", "model.n_head=2", "model.n_embd=16"]
    sets += [
        "model.block_size=32",
        "train.seq_len=16",
        "train.batch_size=2",
        "train.max_steps=2",
        "train.warmup_steps=1",
    ]
    assert gptlab_main(["pretrain", "--out", out, *[a for s in sets for a in ("--set", s)]]) == 0
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    code = gptlab_main(["pretrain", "--out", out, "--resume", "--set", "model.n_layer=2", "--set", "model.n_embd=32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "model.n_layer 1 there, 2 here" in err[0] and "model.n_embd 16 there, 32 here" in err[0]
    assert snapshot(tmp_path / "run") == before


# ----------------------------------------------------------------------------- damaged checkpoints


def no_unpickling_advice(text: str) -> None:
    assert "weights_only" not in text and "unpickl" not in text.lower() and "Traceback" not in text, text


DAMAGE = {
    "state_pt_random_bytes": ("trainer_state/state.pt", lambda p: p.write_bytes(random.Random(0).randbytes(300))),
    "state_pt_truncated": ("trainer_state/state.pt", lambda p: p.write_bytes(p.read_bytes()[:200])),
    "state_pt_a_folder": ("trainer_state/state.pt", lambda p: (p.unlink(), p.mkdir())),
    "state_json_a_list": ("trainer_state/state.json", lambda p: p.write_text("[1, 2]")),
    "state_json_not_utf8": ("trainer_state/state.json", lambda p: p.write_bytes(b'{"step": "\xff"}')),
    "weights_truncated": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "weights_nan": ("model.safetensors", lambda p: scale_weights(p, float("nan"))),
}


def scale_weights(path: Path, factor: float) -> None:
    """Multiply every stored weight by ``factor``: the file stays valid safetensors."""
    save_file({k: v * factor for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_naming_the_file_and_the_reason(trained, capsys, damage):
    name, apply = DAMAGE[damage]
    damaged = trained / "checkpoints" / "step-0000004" / name
    apply(damaged)
    capsys.readouterr()
    trainer = resume(trained)
    err = capsys.readouterr().err
    no_unpickling_advice(err)
    skipped = [line for line in err.splitlines() if "step-0000004" in line]
    assert len(skipped) == 1 and str(damaged) in skipped[0] and "trying the older step-0000002" in skipped[0], err
    assert trainer.resumed_from.name == "step-0000002" and trainer.step == 6
    assert trainer.batches.served == 6  # the position of step 2's checkpoint, then four more steps


def test_when_every_checkpoint_is_damaged_the_run_stops_in_one_line_and_keeps_them(trained, capsys):
    for folder in RunFolder(trained).checkpoints():
        DAMAGE["state_pt_random_bytes"][1](folder / "trainer_state" / "state.pt")
    before = snapshot(trained)
    capsys.readouterr()
    with pytest.raises(UserError) as info:
        resume(trained)
    assert_one_line(info, "no checkpoint", "can be loaded")
    no_unpickling_advice(str(info.value) + capsys.readouterr().err)
    assert snapshot(trained) == before


def test_weights_that_blow_up_before_the_first_update_are_not_blamed_on_the_learning_rate(trained):
    """Finite but huge weights (a damaged file) overflow the loss at once: the learning rate has not acted."""
    newest = trained / "checkpoints" / "step-0000004"
    scale_weights(newest / "model.safetensors", 1e30)
    with pytest.raises(UserError) as info:
        resume(trained)
    message = str(info.value)
    assert_one_line(info, "at step 5", "before this run's first update", str(newest))
    assert "lower train.lr" not in message and "last good" not in message


def test_a_loss_that_blows_up_later_keeps_the_newest_checkpoint_without_calling_it_good(tmp_path, no_mfu):
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return m(batch, batch) * (float("nan") if len(calls) == 3 else 1.0)

    trainer = tiny_trainer(tmp_path)
    trainer.loss_fn = loss_fn
    with pytest.raises(UserError) as info:
        trainer.fit()
    assert_one_line(info, "at step 3", "newest checkpoint", "step-0000002", "lower train.lr")
    assert "last good" not in str(info.value)


# ----------------------------------------------------------------------------- MFU


def test_mfu_is_never_shown_above_100_percent():
    """A peak measured on a busy machine is too low; the figure is clamped, not shown as 130%."""
    window = loop._LogWindow(
        flops_per_step=1e12, tokens_per_step=16, peak=1e9, runtime=Runtime(torch.device("cpu"), None)
    )
    window.add(torch.tensor(2.0), {}, seconds=1.0)
    record = window.close(step=1, lr=1e-3, grad_norm=torch.tensor(1.0))
    assert record["mfu"] == 1.0
    assert window.shown(record, ())["mfu"] == "100.0%"


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def measuring(monkeypatch, flops: float) -> None:
    monkeypatch.setattr(mfu, "measure_matmul_flops", lambda: flops)


def test_the_cpu_peak_is_the_best_measured_on_this_machine_and_cached(cache_home, monkeypatch):
    cpu = torch.device("cpu")
    measuring(monkeypatch, 5e10)
    assert mfu.peak_flops(cpu) == 5e10
    path = cache_home / "gptlab" / "cpu_peak_flops.json"
    assert json.loads(path.read_text()) == {mfu.machine_key(): 5e10}
    assert f"{torch.get_num_threads()} threads" in mfu.machine_key()
    measuring(monkeypatch, 1e10)  # a busy machine reads low: the cached peak stands
    assert mfu.peak_flops(cpu) == 5e10
    measuring(monkeypatch, 8e10)  # an idler moment reads higher: it becomes the peak
    assert mfu.peak_flops(cpu) == 8e10
    assert json.loads(path.read_text()) == {mfu.machine_key(): 8e10}


@pytest.mark.parametrize("cache", ["a_file_where_the_folder_goes", "damaged_json", "relative_path"])
def test_a_cache_that_cannot_be_used_costs_only_the_measurement(cache_home, monkeypatch, cache):
    if cache == "a_file_where_the_folder_goes":
        cache_home.parent.mkdir(parents=True, exist_ok=True)
        cache_home.write_text("not a folder")
    elif cache == "damaged_json":
        (cache_home / "gptlab").mkdir(parents=True)
        (cache_home / "gptlab" / "cpu_peak_flops.json").write_bytes(b"\xff{")
    else:  # the XDG spec: a relative XDG_CACHE_HOME is ignored
        monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
        monkeypatch.setenv("HOME", str(cache_home))
    measuring(monkeypatch, 3e10)
    assert mfu.peak_flops(torch.device("cpu")) == 3e10
    if cache == "relative_path":
        assert mfu.cache_path() == cache_home / ".cache" / "gptlab" / "cpu_peak_flops.json"
        assert not Path("relative").exists()
