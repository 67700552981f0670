"""The gptlab model: a decoder-only transformer, readable top to bottom.

Two families share one code path and differ only by config:
- ``llama``: rotary positions (Hugging Face's rotate-half convention), RMSNorm, SwiGLU MLP,
  grouped-query attention, no biases. Maps to HF ``LlamaForCausalLM``.
- ``gpt2``: learned positions, LayerNorm with bias, GELU (tanh) MLP, tied head.
  Maps to HF ``GPT2LMHeadModel``.

``RewardModel`` is the same trunk with a scalar head instead of the language-model head, read at
each sequence's last real token. Maps to HF ``LlamaForSequenceClassification`` /
``GPT2ForSequenceClassification`` with one label.

The query/key/value projections are one fused matrix, as are SwiGLU's gate and up projections:
fewer, larger matmuls are faster on every device. ``checkpoint.py`` splits and joins them when
reading and writing Hugging Face folders.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptlab import checkpoint
from gptlab.errors import UserError
from gptlab.logprobs import last_real_index, linear_cross_entropy, padded_inputs

FAMILIES = ("llama", "gpt2")


# Far above any model gptlab can train or load (Llama 3 405B: 126 layers, width 16,384, a
# 128k vocabulary), low enough that a typo is refused before it asks for all memory.
SIZE_LIMITS = {
    "vocab_size": 2**22,
    "block_size": 2**21,
    "n_layer": 2**10,
    "n_head": 2**10,
    "n_kv_head": 2**10,
    "n_embd": 2**16,
    "intermediate_size": 2**19,
}


@dataclass
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 2048
    block_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head (multi-head attention)
    n_embd: int = 256
    intermediate_size: int | None = None  # None: 4*n_embd (gpt2), ~8/3*n_embd rounded up to 64 (llama)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool | None = None  # None: tied for gpt2, untied for llama
    bias: bool | None = None  # None: biases for gpt2, none for llama
    dropout: float = 0.0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.tie_embeddings is None:
            self.tie_embeddings = self.family == "gpt2"
        if self.bias is None:
            self.bias = self.family == "gpt2"
        if self.intermediate_size is None:
            if self.family == "gpt2":
                self.intermediate_size = 4 * self.n_embd
            else:
                self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        for name, most in SIZE_LIMITS.items():
            if not 1 <= getattr(self, name) <= most:
                raise ValueError(f"model.{name} must be between 1 and {most:,}, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """The config of a Hugging Face Llama or GPT-2 ``config.json`` (see ``gptlab.checkpoint``)."""
        try:
            return cls(**checkpoint.model_config_fields(hf))
        except (TypeError, ValueError) as e:
            raise UserError(
                f"config.json describes a model gptlab cannot build: {checkpoint.one_line(e)}; fix config.json"
            ) from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype:
            # For bf16 and fp16, F.rms_norm computes in fp32 (the weight too) and rounds once at the end:
            # what converting both to fp32 first did, in one operator instead of four.
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.family == "llama":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (block_size, head_dim) for Hugging Face's rotate-half layout.

    rotate_half(x) = cat(-x2, x1) is roll(x, D/2) = cat(x2, x1) with the first half negated, so
    the sign is folded into the first half of sin here and ``apply_rope`` rolls instead of
    slicing, negating and concatenating.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    positions = torch.arange(config.block_size, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def apply_rope(x, cos, sin, out=None):
    """x: (B, T, heads, D); cos, sin: (B, T, 1, D) or (1, T, 1, D), sin signed as in ``rope_tables``.
    out: where to write the result (x itself may be given: its values are read before)."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin, out=out)


# The attention kernels that scaled_dot_product_attention may pick on CUDA, per use, in PyTorch's
# order of preference. cuDNN's is left out of both: PyTorch prefers it on Hopper, and it builds a
# plan for every new shape (hundreds of milliseconds each), which every decode step of the growing
# cache (one more key), every new prompt length and every new batch length of the alignment stages
# would pay. Why, and what to measure before changing it: docs/inference.md.
ATTENTION_BACKENDS = {
    "inference": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "training": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}


PINNED_ATTENTION_DEVICES = ("cuda",)  # the CPU has no cuDNN attention to avoid
_ENABLED = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
}


def attention_backends(device: torch.device):
    """The context in which the model's attention runs. On the ``PINNED_ATTENTION_DEVICES``, the
    kernels of ``ATTENTION_BACKENDS`` for training while autograd records and for inference
    otherwise, of those the caller has left enabled: a caller's own ``sdpa_kernel`` choice within
    the list narrows it further, and one wholly outside it (cuDNN only, to measure it) is kept.
    Elsewhere, nothing."""
    if device.type not in PINNED_ATTENTION_DEVICES:
        return nullcontext()
    listed = ATTENTION_BACKENDS["training" if torch.is_grad_enabled() else "inference"]
    if torch.compiler.is_compiling():  # torch.compile reads no flags without a graph break; it traces sdpa_kernel
        return sdpa_kernel(listed)
    allowed = [backend for backend in listed if _ENABLED[backend]()]
    return sdpa_kernel(allowed) if allowed else nullcontext()


# CUDA's memory-efficient attention copies a mask whose rows do not start at multiples of 8 elements
# into a padded one in every call (PyTorch's preprocess_mask); Intel's XPU kernel asks for 16.
MASK_ALIGNMENT = 16


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True where a query may attend a key) as the additive one that
    scaled_dot_product_attention would otherwise make of it in every layer: 0 where allowed, -inf
    elsewhere, in ``dtype``. Its rows start every ``MASK_ALIGNMENT`` elements, so its slices along
    the keys can be passed too, and no kernel has to copy it into such a layout first."""
    width = allowed.size(-1)
    padded = torch.empty(
        (*allowed.shape[:-1], -(-width // MASK_ALIGNMENT) * MASK_ALIGNMENT), dtype=dtype, device=allowed.device
    )
    return padded[..., :width].fill_(float("-inf")).masked_fill_(allowed, 0.0)


def _pinned_block(block: nn.Module, x, cos, sin, attn_mask):
    """A block under ``attention_backends`` of its own: an activation checkpoint recomputes it in
    the backward pass, outside the forward's context, and must pick the kernel the forward did."""
    with attention_backends(x.device):
        return block(x, cos, sin, attn_mask, None)


def attention_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in for a model whose parameters (and residual stream) are like
    ``like``: theirs, or autocast's when it is on."""
    if torch.is_autocast_enabled(like.device.type):
        return torch.get_autocast_dtype(like.device.type)
    return like.dtype


class KVCache:
    """Preallocated keys and values for every layer; ``pos`` is how many slots are filled.

    One tensor ``kv`` (layers, 2, batch, kv heads, slots, head size) holds a layer's keys and
    values side by side, so a step writes both with one copy. The cache is for inference: a
    forward through it records no gradients.

    All rows of a batch share one slot index: prompts of different lengths are left-padded
    and the padding is hidden by the attention mask the caller passes.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, 2, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, kv):
        """Write this step's keys and values (2, B, kv heads, T, head size) for one layer; return
        all keys and all values so far."""
        end = self.pos + kv.size(3)
        both = self.kv[layer]
        both[:, :, :, self.pos : end] = kv
        return both[:, :, :, :end].unbind()

    def copy_rows_from(self, source: KVCache, repeats: int) -> None:
        """Take over ``source``'s filled slots, each of its rows repeated ``repeats`` times, so rows
        that continue one prompt (samples, answer candidates) share that prompt's single prefill."""
        filled = source.pos
        mine, theirs = self.kv[..., :filled, :], source.kv[..., :filled, :]
        mine.unflatten(2, (-1, repeats)).copy_(theirs.unsqueeze(3))  # broadcast: no repeated copy in between
        self.pos = filled


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.rotary = config.family == "llama"

    def forward(self, x, cos, sin, attn_mask, kv_cache):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=2)
        if self.rotary:  # queries and keys rotate together: one set of element-wise ops, not two
            # Through a cache, in place: the keys stay next to the values, and the cache takes both in one copy.
            qk = apply_rope(qk, cos, sin, out=qk if kv_cache is not None else None)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        q = q.transpose(1, 2)
        if kv_cache is not None:
            kv = qkv[:, :, self.n_head :].unflatten(2, (2, self.n_kv_head)).permute(2, 0, 3, 1, 4)
            k, v = kv_cache.update(self.layer, kv)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if T == 1 and self.n_kv_head != self.n_head:
            # One query per head: the heads that share a K/V head become its query rows, so any
            # kernel, masked or not, reads each K/V head once and needs no GQA support.
            group = self.n_head // self.n_kv_head
            y = F.scaled_dot_product_attention(
                q.reshape(B, self.n_kv_head, group, self.head_dim),
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
            )
            return self.proj(y.reshape(B, 1, self.n_head * self.head_dim))
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,  # shares K/V heads without copying the cache
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.family == "llama"
        hidden = config.intermediate_size
        self.up = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, attn_mask, kv_cache):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, attn_mask, kv_cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Embeddings start empty: their own N(0, 1) init would only be overwritten below.
        V, T, d = config.vocab_size, config.block_size, config.n_embd
        self.wte = nn.Embedding(V, d, _weight=torch.empty(V, d))
        self.wpe = nn.Embedding(T, d, _weight=torch.empty(T, d)) if config.family == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.family == "llama":
            self.register_buffer("rope_cos", torch.empty(config.block_size, config.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(config.block_size, config.head_dim), persistent=False)
        self.activation_checkpointing = False
        if self.wte.weight.device.type == "meta":
            # A model built on meta is about to be loaded or materialised, and computing on meta
            # costs a second of imports on first use, so weights and rotary tables wait for that.
            return
        self.init_rope()
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def init_rope(self):
        """Recompute the rotary tables (after ``to_empty`` or a load onto the meta device)."""
        if self.config.family == "llama":
            cos, sin = rope_tables(self.config)
            self.rope_cos, self.rope_sin = cos.to(self.wte.weight.device), sin.to(self.wte.weight.device)

    def hidden(self, idx, position_ids=None, attn_mask=None, kv_cache: KVCache | None = None):
        """Final-normed hidden states (B, T, n_embd).

        position_ids: (B, T) absolute positions; default: 0..T-1 (offset by the cache fill).
        attn_mask: broadcastable to (B, 1, T, S), S being the number of keys (cache fill + T):
        boolean, True where a query may attend a key, or additive (``additive_mask``), in the dtype
        attention computes in. Default: causal.
        """
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's block_size {self.config.block_size}"
            )
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        if attn_mask is None and kv_cache is not None and start > 0 and T > 1:
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        x = self.wte(idx)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # once here, not once per layer
            attn_mask = additive_mask(attn_mask, attention_dtype(x))
        cos = sin = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            cos = self.rope_cos[position_ids].unsqueeze(2).to(x.dtype)
            sin = self.rope_sin[position_ids].unsqueeze(2).to(x.dtype)
        x = self.drop(x)
        with attention_backends(x.device):  # once per forward, not per layer: entering it costs microseconds
            for block in self.blocks:
                if self.activation_checkpointing and self.training and kv_cache is None:
                    x = torch.utils.checkpoint.checkpoint(
                        _pinned_block, block, x, cos, sin, attn_mask, use_reentrant=False
                    )
                else:
                    x = block(x, cos, sin, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.norm_f(x)

    def forward(self, idx, targets=None, position_ids=None, attn_mask=None, kv_cache: KVCache | None = None):
        """Logits (B, T, vocab); with ``targets``, only the mean cross-entropy over targets != -100,
        computed without holding all the logits when they are many (``linear_cross_entropy``)."""
        hidden = self.hidden(idx, position_ids, attn_mask, kv_cache)
        if targets is None:
            return self.lm_head(hidden)
        return linear_cross_entropy(hidden, self.lm_head.weight, targets)

    def save_pretrained(self, path, tokenizer=None) -> None:
        """Write a Hugging Face model folder, atomically (see ``gptlab.checkpoint``)."""
        checkpoint.save_pretrained(self, path, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None) -> GPT:
        """Load a gptlab or Hugging Face Llama / GPT-2 folder in eval mode (see ``gptlab.checkpoint``).
        dtype: None keeps the dtype config.json declares (float32 when it declares none)."""
        model = _load(cls, path, device, dtype, reward=False)
        if model.config.tie_embeddings:
            model.lm_head.weight = model.wte.weight  # assign=True gave the head its own Parameter
        model.init_rope()
        return model.eval()

    # ---- what the training loop asks of a model (gptlab.train.protocols.Trainable) --------------

    def write_files(self, folder, tokenizer=None) -> None:
        """The model's files (a Hugging Face folder's) into ``folder``, which the caller made atomic."""
        checkpoint.write_model_files(self, folder, tokenizer=tokenizer)

    def read_state(self, folder) -> dict[str, torch.Tensor]:
        """The state dict that ``write_files`` wrote into ``folder``, on the CPU."""
        return type(self).from_pretrained(folder).state_dict()

    def with_state(self, state: dict[str, torch.Tensor]) -> GPT:
        """A plain, unsharded model of this config holding ``state`` (to write a sharded model's files)."""
        with torch.device("meta"):
            copy = type(self)(self.config)
        copy.load_state_dict(state, assign=True)
        copy.init_rope()
        return copy

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one before the whole model."""
        return list(self.blocks)

    def matrix_parameters(self) -> list[nn.Parameter]:
        """The hidden layers' weight matrices: what Muon may optimise (not embeddings, head, norms, biases)."""
        return [
            module.weight
            for block in self.blocks
            for module in block.modules()
            if isinstance(module, nn.Linear) and module.weight.requires_grad
        ]

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied head counted once); non_embedding drops the lookup tables (Kaplan's N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per linear-layer weight plus attention (PaLM's 12·L·d·T).

        Every weight of a linear layer costs 2 FLOPs forward and 4 backward; the head counts even
        when tied to the embedding, lookups, norms and biases do not. Attention scores and the
        weighted sum cost 2·2·d·T per layer forward, times 3 for forward and backward.
        """
        c = self.config
        T = seq_len or c.block_size
        linear_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * linear_weights + 12 * c.n_layer * c.n_head * c.head_dim * T


class RewardModel(nn.Module):
    """A GPT trunk and a scalar head, ``score``: a sequence's reward is the head applied to the
    trunk's last hidden state at its last real token, found from the attention mask, so that the
    padding on either side and the pad id (which may occur in text) cannot move it.

    The trunk is a GPT whose language-model head is dropped: a head that gets no gradient stops DDP,
    and a reward folder holds none. ``from_causal_lm`` starts one from a causal LM folder.
    """

    def __init__(self, config: ModelConfig, trunk: GPT | None = None):
        super().__init__()
        self.config = config
        self.trunk = trunk if trunk is not None else GPT(config)
        self.trunk.lm_head = None
        embedding = self.trunk.wte.weight
        self.score = nn.Linear(config.n_embd, 1, bias=False, device=embedding.device, dtype=embedding.dtype)
        if embedding.device.type != "meta":
            # A new head as transformers initialises one (normal, std = initializer_range 0.02), which TRL keeps.
            nn.init.normal_(self.score.weight, mean=0.0, std=0.02)

    @property
    def activation_checkpointing(self) -> bool:
        return self.trunk.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.trunk.activation_checkpointing = value

    def forward(self, input_ids, attention_mask):
        """The reward of each row (B,) in fp32. attention_mask (B, T): 1 at real tokens, padding on
        either side; positions count real tokens, so a row scores the same however it is padded."""
        position_ids, attn_mask = padded_inputs(attention_mask)
        hidden = self.trunk.hidden(input_ids, position_ids=position_ids, attn_mask=attn_mask)
        rows = torch.arange(hidden.size(0), device=hidden.device)
        rewards = self.score(hidden[rows, last_real_index(attention_mask)]).squeeze(-1)
        return rewards.to(torch.float32, copy=True)  # not a view of the head's output, which FSDP warns about

    @classmethod
    def from_causal_lm(cls, path, device="cpu", dtype=None) -> RewardModel:
        """A reward model whose trunk is the causal LM at ``path`` and whose score head is new (drawn
        from torch's RNG): where reward-model training starts, as TRL's does from
        ``AutoModelForSequenceClassification.from_pretrained(causal LM)``."""
        trunk = GPT.from_pretrained(path, device=device, dtype=dtype)
        return cls(trunk.config, trunk).eval()

    def save_pretrained(self, path, tokenizer=None) -> None:
        """Write a Hugging Face sequence-classification folder, atomically (see ``gptlab.checkpoint``)."""
        checkpoint.save_pretrained(self, path, tokenizer=tokenizer, reward=True)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None) -> RewardModel:
        """Load a reward-model folder (gptlab's, or a Hugging Face Llama / GPT-2 sequence classifier with
        one label) in eval mode; a causal LM folder is refused in one line."""
        model = _load(cls, path, device, dtype, reward=True)
        model.trunk.init_rope()
        return model.eval()

    # ---- what the training loop asks of a model (gptlab.train.protocols.Trainable) --------------

    def write_files(self, folder, tokenizer=None) -> None:
        checkpoint.write_model_files(self, folder, tokenizer=tokenizer, reward=True)

    def read_state(self, folder) -> dict[str, torch.Tensor]:
        return type(self).from_pretrained(folder).state_dict()

    def with_state(self, state: dict[str, torch.Tensor]) -> RewardModel:
        with torch.device("meta"):
            copy = type(self)(self.config)
        copy.load_state_dict(state, assign=True)
        copy.trunk.init_rope()
        return copy

    def shard_units(self) -> list[nn.Module]:
        return self.trunk.shard_units()

    def matrix_parameters(self) -> list[nn.Parameter]:
        return self.trunk.matrix_parameters()

    def num_params(self) -> int:
        return self.trunk.num_params() + self.score.weight.numel()

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """The trunk's: the head is read once per sequence, not per token."""
        return self.trunk.flops_per_token(seq_len)


def disable_dropout(model: nn.Module) -> nn.Module:
    """No dropout anywhere in ``model``, as TRL's preference trainers start by default: with it, a
    policy's log-probs would be noisy and differ from its reference's before the first update, and
    a reward model would score the two answers of a pair under different masks. The saved
    config keeps its dropout value."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, Attention):
            module.dropout = 0.0
    return model


def _load(model_class, path, device, dtype, reward: bool):
    """A GPT or RewardModel (``reward``) holding the weights of the folder at ``path``; a folder of the
    other kind is refused in one line."""
    folder, hf = checkpoint.read_config(path)
    checkpoint.check_kind(folder, hf, reward)
    config = ModelConfig.from_hf(hf)
    with torch.device("meta"):
        model = model_class(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = checkpoint.read_weights(folder, hf, config, shapes, device, dtype, reward=reward)
    model.load_state_dict(weights, strict=True, assign=True)
    return model
