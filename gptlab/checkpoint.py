"""Checkpoints are Hugging Face model folders.

A gptlab checkpoint is what ``transformers.AutoModelForCausalLM.from_pretrained`` reads as it
is (``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files), and
any local HF Llama or GPT-2 folder loads as a gptlab model. One format means no export step
and no drift between "our" checkpoints and the tools people already use.

gptlab fuses q/k/v into ``attn.qkv`` and SwiGLU's gate/up into ``mlp.up``; HF keeps them
apart, and HF GPT-2's Conv1D stores weights as (in, out). The key map below joins, splits and
transposes them. Loading never unpickles: weights come from safetensors only.

A reward model (``gptlab.model.RewardModel``) is saved as Hugging Face saves a sequence classifier
with one label (``LlamaForSequenceClassification`` / ``GPT2ForSequenceClassification``): the same
trunk tensors, ``score.weight`` instead of the language-model head, and ``pad_token_id`` set, since
transformers reads each row's reward at its last token that is not the pad id.

Writes are atomic (``atomic_folder``): a kill at any moment leaves the old complete folder
or the new complete one, never a mixture.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptlab.errors import UserError
from gptlab.fileio import give_umask_permissions, read_text, remove_stale, write_error

if TYPE_CHECKING:  # the model module builds on this one: it calls the readers below
    from gptlab.model import GPT, ModelConfig, RewardModel

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# The Hugging Face class of each family's causal LM and of its reward model.
CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
REWARD_MODEL_CLASSES = {"llama": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}
_FAMILY_OF_CLASS = {  # for a config.json that names no model_type
    name: family for classes in (CAUSAL_LM_CLASSES, REWARD_MODEL_CLASSES) for family, name in classes.items()
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Buffers some HF checkpoints carry that are recomputed, not learned: GPT-2's causal mask
# (``h.{i}.attn.bias`` / ``attn.masked_bias``) and old Llama's ``rotary_emb.inv_freq``.
_IGNORED_KEYS = re.compile(r"\.attn\.(masked_)?bias$|\.rotary_emb\.inv_freq$")
# ``atomic_folder``'s temp folders: ``.{name}.tmp-{pid}-{12 hex}``, or ``.{name}.tmp-{12 hex}`` as
# gptlab named them before it recorded the writer's process id.
TEMP_FOLDER = r"\..+\.tmp-(?:(?P<pid>\d+)-)?[0-9a-f]{12}"


# --------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it becomes ``path``, on error it is removed.

    The temp folder sits in the same parent so the final renames never cross filesystems.
    Every file is fsynced before the swap, so a crash after the swap cannot expose a folder
    whose files are still only in the page cache. An existing ``path`` is renamed aside, the
    new folder renamed in, then the old one removed; a kill between the two renames leaves the
    old folder at ``.{name}.old``, which the next write to ``path`` puts back first.

    The temp folder is named with the writer's process id: a writer killed mid-way leaves it, and
    the next write into the same parent removes every temp folder whose writer no longer runs. A
    write that fails (a full disk) raises an ``OSError`` naming ``path`` or the file in it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(
            f"cannot write a model folder at {path}: a file of that name exists; remove it or choose another path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _restore_interrupted(path)
    remove_stale(path.parent, TEMP_FOLDER)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()  # mkdtemp would make it 0700; a saved model gets the umask's permissions, as any folder does
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            aside = _aside(path)
            os.rename(path, aside)
            os.rename(tmp, path)
            _fsync_dir(path.parent)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, path)
            _fsync_dir(path.parent)
    except BaseException as e:
        error = write_error(e, path, staged=tmp)  # before the clean-up frees the space it measures
        shutil.rmtree(tmp, ignore_errors=True)
        _restore_interrupted(path)  # a failed rename must not leave the old folder aside
        if error is not None:
            raise error from e
        raise


def _aside(path: Path) -> Path:
    """Where the old folder waits while the new one is renamed in."""
    return path.parent / f".{path.name}.old"


def _restore_interrupted(path: Path) -> None:
    """A kill between the two renames leaves only the old folder, aside: put it back."""
    aside = _aside(path)
    if aside.is_dir():
        if path.exists():
            shutil.rmtree(aside)  # the swap finished; only the clean-up was cut short
        else:
            os.rename(aside, path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in a folder durable (POSIX; Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- key map


@dataclass(frozen=True)
class _Tensor:
    """One gptlab tensor and the HF tensor(s) it is made of."""

    ours: str
    theirs: tuple[str, ...]  # several: concatenated along dim 0 in ours
    sizes: tuple[int, ...] = ()  # rows of each part, when several
    transpose: bool = False  # HF GPT-2's Conv1D stores (in, out)

    def their_shapes(self, our_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        shape = tuple(reversed(our_shape)) if self.transpose else tuple(our_shape)
        if len(self.theirs) == 1:
            return {self.theirs[0]: shape}
        return {name: (rows, *shape[1:]) for name, rows in zip(self.theirs, self.sizes)}


def _key_map(c: ModelConfig, reward: bool = False) -> list[_Tensor]:
    """Every gptlab state-dict tensor (the tied head aside) with its HF name(s); with ``reward``,
    a RewardModel's: the trunk's under ``trunk.`` and the score head instead of the LM head."""
    kinds = ("weight", "bias") if c.bias else ("weight",)
    if c.family == "llama":
        qkv = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim)
        out = [_Tensor("wte.weight", ("model.embed_tokens.weight",))]
        for i in range(c.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            out.append(_Tensor(ours + "attn_norm.weight", (theirs + "input_layernorm.weight",)))
            out.append(_Tensor(ours + "mlp_norm.weight", (theirs + "post_attention_layernorm.weight",)))
            for k in kinds:
                attn = theirs + "self_attn."
                out.append(_Tensor(f"{ours}attn.qkv.{k}", tuple(f"{attn}{p}_proj.{k}" for p in "qkv"), qkv))
                out.append(_Tensor(f"{ours}attn.proj.{k}", (f"{attn}o_proj.{k}",)))
                mlp = theirs + "mlp."
                up = (c.intermediate_size, c.intermediate_size)
                out.append(_Tensor(f"{ours}mlp.up.{k}", (f"{mlp}gate_proj.{k}", f"{mlp}up_proj.{k}"), up))
                out.append(_Tensor(f"{ours}mlp.down.{k}", (f"{mlp}down_proj.{k}",)))
        out.append(_Tensor("norm_f.weight", ("model.norm.weight",)))
    else:
        out = [_Tensor("wte.weight", ("transformer.wte.weight",)), _Tensor("wpe.weight", ("transformer.wpe.weight",))]
        for i in range(c.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for k in ("weight", "bias"):
                conv1d = k == "weight"
                out.append(_Tensor(f"{ours}attn_norm.{k}", (f"{theirs}ln_1.{k}",)))
                out.append(_Tensor(f"{ours}attn.qkv.{k}", (f"{theirs}attn.c_attn.{k}",), transpose=conv1d))
                out.append(_Tensor(f"{ours}attn.proj.{k}", (f"{theirs}attn.c_proj.{k}",), transpose=conv1d))
                out.append(_Tensor(f"{ours}mlp_norm.{k}", (f"{theirs}ln_2.{k}",)))
                out.append(_Tensor(f"{ours}mlp.up.{k}", (f"{theirs}mlp.c_fc.{k}",), transpose=conv1d))
                out.append(_Tensor(f"{ours}mlp.down.{k}", (f"{theirs}mlp.c_proj.{k}",), transpose=conv1d))
        out += [_Tensor(f"norm_f.{k}", (f"transformer.ln_f.{k}",)) for k in ("weight", "bias")]
    if reward:
        return [replace(t, ours="trunk." + t.ours) for t in out] + [_Tensor("score.weight", ("score.weight",))]
    if not c.tie_embeddings:
        out.append(_Tensor("lm_head.weight", ("lm_head.weight",)))
    return out


def _base_prefix(family: str) -> str:
    return "model." if family == "llama" else "transformer."


# --------------------------------------------------------------------------- config


def hf_config(config: ModelConfig, dtype: torch.dtype = torch.float32, tokenizer=None, reward: bool = False) -> dict:
    """The ``config.json`` transformers needs for this model (v4 and v5 spellings both present);
    with ``reward``, for its reward model: a sequence classifier with one label, as transformers
    writes one (``id2label``; ``num_labels`` for readers that look for it)."""
    c = config
    if c.family == "llama":
        out = {
            "architectures": [CAUSAL_LM_CLASSES["llama"]],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.n_embd,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "head_dim": c.head_dim,
            "max_position_embeddings": c.block_size,
            "rms_norm_eps": c.norm_eps,
            "hidden_act": "silu",
            "attention_bias": c.bias,
            "mlp_bias": c.bias,
            "attention_dropout": c.dropout,
            "tie_word_embeddings": c.tie_embeddings,
            "rope_theta": c.rope_theta,  # transformers v4
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},  # v5
        }
    else:
        if c.n_kv_head != c.n_head:
            raise UserError(
                f"cannot save a gpt2-family model with n_kv_head={c.n_kv_head} != n_head={c.n_head}: "
                "Hugging Face GPT-2 has no grouped-query attention; use family llama or n_kv_head = n_head"
            )
        if not c.bias:
            raise UserError(
                "cannot save a gpt2-family model with bias=false: Hugging Face GPT-2 always has biases; "
                "use family llama or bias = true"
            )
        out = {
            "architectures": [CAUSAL_LM_CLASSES["gpt2"]],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.block_size,
            "n_ctx": c.block_size,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": c.intermediate_size,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout,
            "scale_attn_weights": True,
            "tie_word_embeddings": c.tie_embeddings,
        }
    out.update(_special_ids(tokenizer))
    if reward:
        out.update(
            architectures=[REWARD_MODEL_CLASSES[c.family]],
            num_labels=1,
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
        )
    name = str(dtype).removeprefix("torch.")
    out["torch_dtype"] = name  # transformers v4
    out["dtype"] = name  # v5
    # gptlab's own spelling, for people reading the folder; loading derives everything from the
    # HF fields above, so a folder edited by HF tools (which keep this key) stays correct.
    out["gptlab"] = c.to_dict()
    return out


def _special_ids(tokenizer) -> dict:
    """bos/eos/pad ids, written even when unknown: HF's class defaults (e.g. GPT-2's 50256) would be wrong."""
    return {
        f"{name}_token_id": getattr(tokenizer, f"{name}_id", None) if tokenizer is not None else None
        for name in ("bos", "eos", "pad")
    }


def model_config_fields(hf: dict) -> dict:
    """Translate a Hugging Face Llama or GPT-2 ``config.json`` (v4 or v5 spelling) to ModelConfig
    fields (``ModelConfig.from_hf`` builds the config from them).

    Missing fields take transformers' class defaults, as ``from_pretrained`` would.
    """
    family = _family(hf)

    def get(key: str, default):
        value = hf.get(key)
        return default if value is None else value

    def get_int(key: str, default: int) -> int:
        value = get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(
                f"config.json has {key} = {value!r}, which must be a positive whole number; fix config.json"
            )
        return value

    def get_float(key: str, default: float) -> float:
        value = get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UserError(f"config.json has {key} = {value!r}, which must be a number; fix config.json")
        return float(value)

    if family == "llama":
        hidden, heads = get_int("hidden_size", 4096), get_int("num_attention_heads", 32)
        head_dim = get_int("head_dim", max(hidden // heads, 1))
        if head_dim * heads != hidden:
            raise UserError(
                f"config.json has head_dim={head_dim} with {heads} heads and hidden_size={hidden}: gptlab needs "
                "head_dim = hidden_size / num_attention_heads; this model cannot be loaded in gptlab, use transformers"
            )
        if get("hidden_act", "silu") != "silu":
            raise UserError(
                f"config.json has hidden_act={hf['hidden_act']!r}: gptlab's Llama uses silu only; "
                "use transformers for this model"
            )
        if bool(get("attention_bias", False)) != bool(get("mlp_bias", False)):
            raise UserError(
                "config.json has attention_bias != mlp_bias: gptlab has one bias switch for all projections; "
                "use transformers for this model"
            )
        fields = dict(
            family="llama",
            vocab_size=get_int("vocab_size", 32000),
            block_size=get_int("max_position_embeddings", 2048),
            n_layer=get_int("num_hidden_layers", 32),
            n_head=heads,
            n_kv_head=get_int("num_key_value_heads", heads),
            n_embd=hidden,
            intermediate_size=get_int("intermediate_size", 11008),
            rope_theta=_rope_theta(hf),
            norm_eps=get_float("rms_norm_eps", 1e-6),
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            bias=bool(get("attention_bias", False)),
            dropout=get_float("attention_dropout", 0.0),
        )
    else:
        activation = get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(
                f"config.json has activation_function={activation!r}: gptlab's GPT-2 uses the tanh GELU "
                "(gelu_new) only; use transformers for this model"
            )
        if not get("scale_attn_weights", True) or get("scale_attn_by_inverse_layer_idx", False):
            raise UserError(
                "config.json changes GPT-2's attention scaling (scale_attn_weights / scale_attn_by_inverse_layer_idx): "
                "gptlab scales by 1/sqrt(head_dim) only; use transformers for this model"
            )
        n_embd = get_int("n_embd", 768)
        fields = dict(
            family="gpt2",
            vocab_size=get_int("vocab_size", 50257),
            block_size=get_int("n_positions", 1024),
            n_layer=get_int("n_layer", 12),
            n_head=get_int("n_head", 12),
            n_embd=n_embd,
            intermediate_size=get_int("n_inner", 4 * n_embd),
            norm_eps=get_float("layer_norm_epsilon", 1e-5),
            tie_embeddings=bool(get("tie_word_embeddings", True)),
            bias=True,
            dropout=get_float("resid_pdrop", 0.1),
        )
    return fields


def _family(hf: dict) -> str:
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type is None and architectures:
        model_type = _FAMILY_OF_CLASS.get(architectures[0], architectures[0])
    if model_type not in ("llama", "gpt2"):
        raise UserError(
            f"unsupported model type {model_type!r} in config.json: gptlab loads Llama and GPT-2 models only; "
            "use transformers for other architectures"
        )
    return model_type


def _rope_theta(hf: dict) -> float:
    """rope_theta from v5's ``rope_parameters`` or v4's top level; scaled RoPE variants are refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for spec in (params, scaling):
        if not isinstance(spec, dict):
            raise UserError(f"config.json has a malformed rope_parameters / rope_scaling ({spec!r}); fix config.json")
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise UserError(
                f"config.json asks for RoPE scaling {kind!r}: gptlab implements plain RoPE only; "
                "use transformers for this model"
            )
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        return 10000.0
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise UserError(f"config.json has rope_theta = {theta!r}, which must be a positive number; fix config.json")
    return float(theta)


# --------------------------------------------------------------------------- save


def save_pretrained(model: GPT | RewardModel, path: str | os.PathLike, tokenizer=None, reward: bool = False) -> None:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face folder at ``path``, atomically;
    ``reward``: the model is a RewardModel."""
    hf_config(model.config)  # refuse unsavable configs before touching the disk
    with atomic_folder(path) as tmp:
        write_model_files(model, tmp, tokenizer=tokenizer, reward=reward)


def write_model_files(
    model: GPT | RewardModel, folder: str | os.PathLike, tokenizer=None, reward: bool = False
) -> None:
    """Write the model files into an existing folder, without atomicity.

    For callers that already hold an ``atomic_folder`` (the training loop adds ``trainer_state/``).
    A reward model gets no generation_config.json: transformers writes none for a model that
    cannot generate.
    """
    folder = Path(folder)
    state = model.state_dict()
    key_map = _key_map(model.config, reward)
    dtype = state[key_map[0].ours].dtype  # the token embedding's
    config = hf_config(model.config, dtype, tokenizer, reward)
    tensors = {}
    for t in key_map:
        ours = state[t.ours].detach()
        if t.transpose:
            ours = ours.t()
        parts = ours.split(list(t.sizes), dim=0) if t.sizes else (ours,)
        for name, part in zip(t.theirs, parts):
            # Own, contiguous CPU memory: safetensors refuses views that share storage.
            tensors[name] = part.to("cpu").clone(memory_format=torch.contiguous_format)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    give_umask_permissions(folder / WEIGHTS_NAME)  # safetensors writes through a temp file made 0600
    _write_json(folder / CONFIG_NAME, config)
    if not reward:
        _write_json(folder / GENERATION_CONFIG_NAME, _generation_config(tokenizer))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _generation_config(tokenizer) -> dict:
    generation = {k: v for k, v in _special_ids(tokenizer).items() if v is not None}
    end = getattr(tokenizer, "end_id", None)
    if end is not None and generation.get("eos_token_id") is not None:
        # A chat reply ends with <|end|>: transformers' generate stops there too.
        generation["eos_token_id"] = [generation["eos_token_id"], end]
    return generation


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- load


def read_config(path: str | os.PathLike) -> tuple[Path, dict]:
    """(the model folder, its config.json) for a gptlab or Hugging Face Llama / GPT-2 folder."""
    folder = _model_folder(Path(path))
    hf = _read_json(folder / CONFIG_NAME)
    if not isinstance(hf, dict):
        raise UserError(f"{folder / CONFIG_NAME} is not a JSON object; re-save the model folder")
    return folder, hf


def is_reward_model(hf: dict) -> bool:
    """Whether a ``config.json`` describes a sequence classifier (a reward model), not a causal LM."""
    return any(str(name).endswith("ForSequenceClassification") for name in hf.get("architectures") or [])


def check_kind(folder: Path, hf: dict, reward: bool) -> None:
    """Refuse, in one line, a reward model where a causal LM is expected (``reward`` False) and the
    reverse, and a sequence classifier with more than one label, which is no reward model."""
    found = (hf.get("architectures") or ["a model without architectures"])[0]
    if is_reward_model(hf) and not reward:
        raise UserError(
            f"{folder} holds a reward model ({found}): it scores text and has no language-model head; "
            "give a causal LM folder, such as an SFT run's model/"
        )
    if reward and not is_reward_model(hf):
        raise UserError(
            f"{folder} holds a causal language model ({found}), not a reward model; give the model/ folder of a "
            f"`gptlab reward` run, or train one from this model with `gptlab reward --set init={folder}`"
        )
    labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 1)
    if reward and labels != 1:
        raise UserError(
            f"{folder} holds a sequence classifier with {labels} labels; a reward model gives one score "
            "(num_labels = 1): give a reward model's folder"
        )


def read_weights(
    folder: Path,
    hf: dict,
    config: ModelConfig,
    our_shapes: dict[str, tuple[int, ...]],
    device="cpu",
    dtype: torch.dtype | str | None = None,
    reward: bool = False,
) -> dict[str, torch.Tensor]:
    """The folder's weights as a gptlab state dict (a RewardModel's with ``reward``), checked
    against ``our_shapes`` (the model's state-dict shapes). dtype: None keeps the dtype config.json
    declares (float32 when it declares none). A tied head shares the embedding's tensor."""
    dtype = _dtype(dtype if dtype is not None else hf.get("dtype") or hf.get("torch_dtype") or "float32")
    key_map = _key_map(config, reward)
    with ExitStack() as stack:
        stored = _open_weights(folder, config.family, stack)
        _check_weights(folder, config, key_map, our_shapes, stored)
        state = {}
        for t in key_map:
            parts = [_read_tensor(stored, name).to(device=device, dtype=dtype) for name in t.theirs]
            tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            state[t.ours] = (tensor.t() if t.transpose else tensor).contiguous()
    if config.tie_embeddings and not reward:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def _model_folder(path: Path) -> Path:
    if not path.exists():
        hint = ""
        if _aside(path).is_dir():
            hint = f" (a save was interrupted; the previous version is in {_aside(path)})"
        raise UserError(f"model folder {path} does not exist{hint}; check the path")
    if not path.is_dir() or not (path / CONFIG_NAME).is_file():
        why = "it has no config.json" if path.is_dir() else "it is a file"
        raise UserError(
            f"{path} is not a model folder: {why}; point to a folder written by save_pretrained "
            "(config.json + model.safetensors)"
        )
    return path


def _read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        where = f"{e.msg} at line {e.lineno} column {e.colno}"
        raise UserError(f"{path} is not valid JSON ({where}); fix or re-create it") from None


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise UserError(
            f"unsupported dtype {value!r}: gptlab loads weights as one of {', '.join(_DTYPES)}; pick one of those"
        )
    return _DTYPES[name]


def _open_weights(folder: Path, family: str, stack: ExitStack) -> dict[str, tuple]:
    """Map each stored tensor name, normalised to HF's full key names, to (open file, name in file)."""
    if (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    elif (folder / WEIGHTS_INDEX_NAME).is_file():
        index = _read_json(folder / WEIGHTS_INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise UserError(f"{folder / WEIGHTS_INDEX_NAME} has no weight_map; re-save the model folder")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise UserError(f"{f} is listed in {WEIGHTS_INDEX_NAME} but missing; copy the complete model folder")
    elif any(folder.glob("pytorch_model*.bin")):
        raise UserError(
            f"{folder} holds only pickled weights (pytorch_model.bin), which gptlab does not load because "
            "unpickling can run code; convert them to model.safetensors with transformers' "
            "save_pretrained(safe_serialization=True)"
        )
    else:
        raise UserError(f"{folder} has no weights (no {WEIGHTS_NAME}); copy the complete model folder")
    stored = {}
    for f in files:
        try:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"cannot read {f}: {one_line(e)}; the file is corrupt or truncated, re-save or re-copy it"
            ) from None
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle has keys(), no __iter__)
            stored[name] = (handle, name, f)
    prefix = _base_prefix(family)
    if not any(k.startswith(prefix) for k in stored):  # saved from the base model, e.g. GPT2Model
        stored = {(k if k.startswith("lm_head.") else prefix + k): v for k, v in stored.items()}
    return stored


def _read_tensor(stored: dict[str, tuple], name: str) -> torch.Tensor:
    handle, key, file = stored[name]
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"cannot read {name} from {file}: {one_line(e)}; the file is corrupt, re-save or re-copy it"
        ) from None


def _check_weights(folder: Path, config: ModelConfig, key_map: list[_Tensor], our_shapes: dict, stored: dict) -> None:
    """Strict key and shape check in HF names, so the error names the tensor the user can find."""
    expected = {}
    for t in key_map:
        expected.update(t.their_shapes(our_shapes[t.ours]))
    advice = "the weights and config.json must come from the same model; re-save the folder or fix config.json"
    for name, shape in expected.items():
        if name not in stored:
            raise UserError(
                f"{folder} does not match its config.json: tensor {name} is missing from the weights; {advice}"
            )
        handle, key, _ = stored[name]
        found = tuple(handle.get_slice(key).get_shape())
        if found != shape:
            raise UserError(
                f"{folder} does not match its config.json: {name} has shape {found} in the weights but the config "
                f"needs {shape}; {advice}"
            )
    tied_head = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(k for k in stored if k not in expected and k not in tied_head and not _IGNORED_KEYS.search(k))
    if unexpected:
        raise UserError(
            f"{folder} does not match its config.json: the weights hold {unexpected[0]}, which the config has no "
            f"place for ({len(unexpected)} unexpected tensor(s)); {advice}"
        )


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
