"""gptlab checkpoints are Hugging Face folders: both directions, exact round trips, atomic writes, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers  # the test extra's: a broken install fails here rather than skipping the file
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptlab import checkpoint
from gptlab.checkpoint import atomic_folder, save_pretrained
from gptlab.errors import UserError
from gptlab.model import GPT, ModelConfig
from helpers import assert_one_line, snapshot

VOCAB = 97
TOL = 1e-4


def hf_llama(tmp_path: Path, name: str = "hf_llama", **overrides) -> tuple[Path, torch.nn.Module]:
    """A random HF Llama with GQA and an untied head, saved by transformers itself."""
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    fields.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields, attn_implementation="eager"))
    _randomize_norms(model)
    path = tmp_path / name
    model.save_pretrained(path)
    return path, model.eval()


def hf_gpt2(tmp_path: Path, name: str = "hf_gpt2", **overrides) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=6, n_positions=64, bos_token_id=None, eos_token_id=None
    )
    fields.update(overrides)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields, attn_implementation="eager"))
    _randomize_norms(model)
    path = tmp_path / name
    model.save_pretrained(path)
    return path, model.eval()


def _randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights start at 1 and biases at 0: make them random so a mis-mapped one shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)


def tiny(family: str, **overrides) -> GPT:
    torch.manual_seed(0)
    fields = dict(family=family, vocab_size=VOCAB, block_size=64, n_layer=2, n_head=6, n_embd=48)
    if family == "llama":
        fields.update(n_kv_head=2, rope_theta=1234.5)
    fields.update(overrides)
    model = GPT(ModelConfig(**fields)).eval()
    _randomize_norms(model)
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def max_diff(ours: GPT, theirs: torch.nn.Module) -> float:
    x = ids()
    return (ours(x) - theirs(x).logits).abs().max().item()


# --------------------------------------------------------------------------- HF -> gptlab


def test_hf_llama_gqa_untied_loads_with_same_logits(tmp_path):
    path, hf = hf_llama(tmp_path)
    model = GPT.from_pretrained(path)
    assert (model.config.n_head, model.config.n_kv_head, model.config.tie_embeddings) == (6, 2, False)
    assert not model.training
    assert max_diff(model, hf) < TOL


def test_hf_llama_tied_loads_with_shared_head(tmp_path):
    path, hf = hf_llama(tmp_path, tie_word_embeddings=True)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
    model = GPT.from_pretrained(path)
    assert model.lm_head.weight is model.wte.weight
    assert max_diff(model, hf) < TOL


def test_hf_gpt2_loads_with_and_without_transformer_prefix(tmp_path):
    path, hf = hf_gpt2(tmp_path)
    assert max_diff(GPT.from_pretrained(path), hf) < TOL

    # Old-style checkpoint: keys without "transformer.", plus the causal-mask buffers it carried.
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = GPT.from_pretrained(path)
    assert model.lm_head.weight is model.wte.weight
    assert max_diff(model, hf) < TOL


def test_hf_gpt2_untied_loads(tmp_path):
    path, hf = hf_gpt2(tmp_path, tie_word_embeddings=False)
    model = GPT.from_pretrained(path)
    assert not model.config.tie_embeddings
    assert max_diff(model, hf) < TOL


def test_sharded_hf_folder_loads(tmp_path):
    path = tmp_path / "sharded"
    _, hf = hf_llama(tmp_path)
    hf.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    assert max_diff(GPT.from_pretrained(path), hf) < TOL


@pytest.mark.parametrize("spelling", ["v4", "v5"])
def test_rope_theta_and_dtype_in_both_transformers_spellings(tmp_path, spelling):
    path, hf = hf_llama(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    config = json.loads((path / "config.json").read_text())
    for key in ("rope_theta", "rope_parameters", "torch_dtype", "dtype"):
        config.pop(key, None)
    if spelling == "v4":
        config.update(rope_theta=500.0, rope_scaling=None, torch_dtype="float32")
    else:
        config.update(rope_parameters={"rope_type": "default", "rope_theta": 500.0}, dtype="float32")
    (path / "config.json").write_text(json.dumps(config))
    model = GPT.from_pretrained(path)
    assert model.config.rope_theta == 500.0
    assert max_diff(model, hf) < TOL


def test_head_dim_given_or_derived():
    base = dict(model_type="llama", hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=1)
    assert ModelConfig.from_hf(base).head_dim == 16
    assert ModelConfig.from_hf({**base, "head_dim": 16}).head_dim == 16
    with pytest.raises(UserError, match="head_dim"):
        ModelConfig.from_hf({**base, "head_dim": 32})


def test_dtype_from_config_or_argument(tmp_path):
    path, _ = hf_llama(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert GPT.from_pretrained(path).wte.weight.dtype == torch.bfloat16
    assert GPT.from_pretrained(path, dtype=torch.float16).lm_head.weight.dtype == torch.float16
    assert GPT.from_pretrained(path, dtype="float32").blocks[0].attn.qkv.weight.dtype == torch.float32


# --------------------------------------------------------------------------- gptlab -> HF


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gptlab_folder_loads_in_transformers_with_same_logits(tmp_path, family):
    model = tiny(family)
    save_pretrained(model, tmp_path / "m")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    assert max_diff(model, hf.eval()) < TOL

    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["gptlab"] == model.config.to_dict()
    assert config["torch_dtype"] == config["dtype"] == "float32"  # transformers v4 and v5 spellings
    if family == "llama":
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == model.config.rope_theta
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = f.keys()  # safe_open has no __contains__
        assert "lm_head.weight" not in keys if model.config.tie_embeddings else "lm_head.weight" in keys


def test_gptlab_llama_with_bias_and_tied_head_loads_in_transformers(tmp_path):
    model = tiny("llama", bias=True, tie_embeddings=True)
    save_pretrained(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert max_diff(model, hf) < TOL


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        ("llama", {"bias": True, "tie_embeddings": True}),
        ("gpt2", {}),
        ("gpt2", {"tie_embeddings": False}),
    ],
)
def test_round_trip_is_bitwise(tmp_path, family, overrides):
    model = tiny(family, **overrides)
    save_pretrained(model, tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_embeddings


def test_round_trip_keeps_bfloat16(tmp_path):
    model = tiny("llama").to(torch.bfloat16)
    save_pretrained(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = GPT.from_pretrained(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert loaded.wte.weight.dtype == torch.bfloat16


class FakeTokenizer:
    bos_id, eos_id, pad_id = 1, 2, None

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


def test_tokenizer_files_and_special_ids(tmp_path):
    save_pretrained(tiny("gpt2"), tmp_path / "m", tokenizer=FakeTokenizer())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert (tmp_path / "m" / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- atomic writes


def test_failed_save_leaves_old_folder_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    save_pretrained(tiny("llama"), path)
    before = snapshot(path)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(tiny("llama", n_layer=1), path)
    assert snapshot(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_swap_puts_old_folder_back(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    save_pretrained(tiny("llama"), path)
    before = snapshot(path)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".ckpt.tmp-"):  # the old folder is already aside by now
            raise OSError("simulated rename failure")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(tiny("gpt2"), path)
    assert snapshot(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_successful_save_replaces_old_folder_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained(tiny("llama"), path)
    (path / "stale.txt").write_text("from the old checkpoint")
    save_pretrained(tiny("gpt2"), path)
    assert not (path / "stale.txt").exists()
    assert GPT.from_pretrained(path).config.family == "gpt2"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_folder_holds_extra_state_and_restores_an_interrupted_swap(tmp_path):
    path = tmp_path / "checkpoints" / "step-0000010"
    with atomic_folder(path) as tmp:
        assert tmp.parent == path.parent and not path.exists()
        checkpoint.write_model_files(tiny("llama"), tmp)
        (tmp / "trainer_state").mkdir()
        (tmp / "trainer_state" / "state.json").write_text('{"step": 10}')
    assert (path / "trainer_state" / "state.json").read_text() == '{"step": 10}'
    assert GPT.from_pretrained(path).config.family == "llama"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by whom any new folder would be

    # A kill between "rename old aside" and "rename new in" leaves only the old folder, aside.
    aside = path.parent / f".{path.name}.old"
    os.rename(path, aside)
    with pytest.raises(UserError, match="interrupted"):
        GPT.from_pretrained(path)
    with atomic_folder(path) as tmp:
        assert path.is_dir() and not aside.exists()  # put back before anything else happens
        (tmp / "marker").write_text("new")
    assert (path / "marker").read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# --------------------------------------------------------------------------- errors


def assert_fails_in_one_line(fn, *fragments: str) -> None:
    with pytest.raises(UserError) as error:
        fn()
    assert_one_line(error, *fragments)


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_error_missing_path(tmp_path):
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "nope"), "does not exist")


def test_error_not_a_folder(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "file.txt"), "not a model folder", "is a file")
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "empty"), "not a model folder", "config.json")


def test_error_invalid_json(tmp_path):
    save_pretrained(tiny("llama"), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama",')
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "m"), "not valid JSON", "line 1")


@pytest.mark.parametrize("model_type", ["bert", "mistral"])
def test_error_unsupported_architecture(tmp_path, model_type):
    save_pretrained(tiny("llama"), tmp_path / "m")
    edit_config(tmp_path / "m", model_type=model_type)
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "m"), "unsupported model type", model_type)


def test_error_rope_scaling(tmp_path):
    save_pretrained(tiny("llama"), tmp_path / "m")
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    edit_config(tmp_path / "m", rope_parameters=llama3)
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "m"), "llama3")
    edit_config(tmp_path / "m", rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0})
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "m"), "linear")


def test_error_bad_config_value(tmp_path):
    save_pretrained(tiny("llama"), tmp_path / "m")
    edit_config(tmp_path / "m", num_hidden_layers="two")
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "m"), "num_hidden_layers")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_error_corrupt_weights(tmp_path, damage):
    save_pretrained(tiny("llama"), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "m"), "model.safetensors", "corrupt")


def test_error_only_pickled_weights(tmp_path):
    save_pretrained(tiny("llama"), tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "m"), "pytorch_model.bin", "safetensors")


def test_error_no_weights(tmp_path):
    save_pretrained(tiny("llama"), tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "m"), "no weights")


def rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_error_missing_tensor(tmp_path):
    save_pretrained(tiny("llama"), tmp_path / "m")
    rewrite_weights(tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    assert_fails_in_one_line(
        lambda: GPT.from_pretrained(tmp_path / "m"), "model.layers.1.self_attn.k_proj.weight", "missing"
    )


def test_error_unexpected_tensor(tmp_path):
    save_pretrained(tiny("llama"), tmp_path / "m")
    rewrite_weights(tmp_path / "m", lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2, 2)}))
    assert_fails_in_one_line(lambda: GPT.from_pretrained(tmp_path / "m"), "model.layers.2.mlp.up_proj.weight")


def test_error_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    save_pretrained(tiny("llama"), tmp_path / "m")
    edit_config(tmp_path / "m", vocab_size=VOCAB + 3)
    assert_fails_in_one_line(
        lambda: GPT.from_pretrained(tmp_path / "m"), "model.embed_tokens.weight", f"({VOCAB}, 48)", f"({VOCAB + 3}, 48)"
    )


@pytest.mark.parametrize("overrides, fragment", [({"n_kv_head": 2}, "n_kv_head"), ({"bias": False}, "bias")])
def test_error_gpt2_configs_hf_cannot_express(tmp_path, overrides, fragment):
    assert_fails_in_one_line(lambda: save_pretrained(tiny("gpt2", **overrides), tmp_path / "m"), fragment)
    assert not (tmp_path / "m").exists()
