from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gptlab.config import build, read_raw
from gptlab.errors import UserError
from gptlab.model import ModelConfig
from gptlab.train.loop import TrainConfig, learning_rate


@dataclass
class StageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nfamily = "gpt2"\nn_layer = 3\n[train]\nlr = 1e-3\n')
    cfg = build(StageConfig, read_raw(path, ["model.n_layer=5", "train.lr=2e-4", "train.compile=true"]))
    assert cfg.model.family == "gpt2" and cfg.model.n_layer == 5
    assert cfg.train.lr == 2e-4 and cfg.train.compile is True
    assert cfg.model.tie_embeddings is True  # derived from the family


def test_every_key_has_a_default():
    cfg = build(StageConfig, {})
    assert cfg.train.min_lr == cfg.train.lr / 10


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layr=3", "did you mean 'model.n_layer'"),
        ("modle.n_layer=3", "did you mean 'model'"),
        ("train.warmup=3", "did you mean 'train.warmup_steps'"),
        ("model.n_layer=four", "must be int"),
        ("train.lr=fast", "must be float"),
        ("train.schedule=step", "cosine"),
        ("model.n_embd=100", "invalid config"),
        ("train.lr", "section.key=value"),
    ],
)
def test_mistakes_are_one_line_user_errors(override, message):
    with pytest.raises(UserError, match=message) as info:
        build(StageConfig, read_raw(None, [override]))
    assert "\n" not in str(info.value)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        read_raw(bad)
    with pytest.raises(UserError, match="does not exist"):
        read_raw(tmp_path / "missing.toml")


def test_cosine_schedule_closed_form():
    cfg = TrainConfig(max_steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 60) == pytest.approx(0.55)  # halfway: the mean of lr and min_lr
    assert learning_rate(cfg, 110) == pytest.approx(0.1)


def test_linear_warmdown_closed_form():
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear", warmdown_fraction=0.2)
    assert learning_rate(cfg, 79) == 1.0
    assert learning_rate(cfg, 89) == pytest.approx(0.5)
    assert learning_rate(cfg, 99) == pytest.approx(0.0)


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_builds_for_the_command_its_first_line_names(path, tmp_path, monkeypatch):
    from gptlab import ladder, pretrain
    from gptlab.align import dpo, grpo, ppo, reward, sft

    command = path.read_text().splitlines()[0].split("gptlab ")[1].split()[0]
    if command == "pretrain":
        monkeypatch.setattr(pretrain, "read_meta", lambda shards: {"vocab_size": 4096})
        cfg = pretrain.load_config(str(path), [], tmp_path, resume=False)
        assert cfg.train.seq_len <= cfg.model.block_size
        assert cfg.train.batch_size % (cfg.train.micro_batch_size or 1) == 0
    elif command in ("sft", "reward", "dpo", "ppo", "grpo"):
        stage = {"sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo, "grpo": grpo}[command]
        stage.load_config(str(path), [], tmp_path, resume=False)
    else:
        assert command == "ladder", f"{path.name}: first line names no command gptlab has a config for"
        # It says it is the default ladder written out: it must stay that.
        assert ladder.load_config("default", str(path), []) == ladder.load_config("default", None, [])


def test_each_stage_config_is_what_its_dataclass_declares():
    """build() makes a section from its class, so a default written on the parent field (a
    default_factory with other values) would be silently ignored (the ladder's was, from its first commit)."""
    from gptlab.align.sft import SftConfig
    from gptlab.ladder import LadderConfig
    from gptlab.pretrain import PretrainConfig

    for cls in (PretrainConfig, SftConfig, LadderConfig):
        assert build(cls, {}) == cls(), cls.__name__
