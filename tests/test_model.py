import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gptlab.logprobs
from gptlab.logprobs import mean_cross_entropy
from gptlab.model import GPT, ModelConfig


def tiny(family: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(family=family, vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg)).eval()


def test_flops_per_token_equals_hand_count():
    model = tiny("llama", n_kv_head=2, intermediate_size=64)
    per_block = 32 * (4 + 2 * 2) * 8 + 32 * 32 + 32 * 2 * 64 + 64 * 32  # qkv, proj, gate+up, down
    head = 100 * 32
    attention = 12 * 2 * 32 * 16  # 12 * n_layer * d * T
    assert model.flops_per_token(16) == 6 * (2 * per_block + head) + attention


def test_parameter_count_counts_tied_head_once():
    tied = tiny("gpt2")
    untied = tiny("gpt2", tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 100 * 32
    assert tied.num_params(non_embedding=True) == tied.num_params() - 100 * 32 - 32 * 32


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_is_mean_cross_entropy_ignoring_minus_100(family):
    model = tiny(family)
    idx = torch.randint(0, 100, (2, 12))
    targets = torch.randint(0, 100, (2, 12))
    targets[0, :5] = -100
    targets[1, 7:] = -100
    logits = model(idx)
    keep = targets != -100
    expected = -F.log_softmax(logits[keep], -1).gather(1, targets[keep].unsqueeze(1)).mean()
    assert torch.allclose(model(idx, targets), expected, atol=1e-6)


class MostLogits(TorchDispatchMode):
    """Records the most rows of logits (tensors as wide as the vocabulary) any op outputs while the mode is on."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.most = vocab_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.size(-1) == self.vocab_size:
                self.most = max(self.most, tensor.numel() // self.vocab_size)
        return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_loss_with_many_logits_never_holds_them_all_and_trains_as_the_plain_loss(family, monkeypatch):
    """GPT.forward(idx, targets) takes the head's loss a chunk of rows at a time once the logits are many:
    no tensor of the forward or backward holds all of them, and the loss and every parameter's gradient
    (the tied gpt2 head's through the embedding too) equal those of the full logits to fp32 rounding."""
    model = tiny(family).train()
    idx, targets = torch.randint(0, 100, (4, 32)), torch.randint(0, 100, (4, 32))
    targets[1] = -100
    plain = mean_cross_entropy(model(idx), targets)
    plain.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(gptlab.logprobs, "LOGITS_CHUNK_ELEMENTS", 100 * 40)  # 40 rows of the 128 at a time
    with MostLogits(100) as logits:
        loss = model(idx, targets)
        loss.backward()
    assert logits.most == 40
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fresh_model_loss_is_near_uniform():
    model = tiny("llama")
    idx = torch.randint(0, 100, (4, 32))
    assert abs(model(idx, idx).item() - math.log(100)) < 0.2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_rows_with_reset_positions_and_block_mask_equal_separate_runs(family):
    """Two documents in one row, with positions restarting and a block-diagonal mask, give the
    same logits as each document alone: what SFT packing relies on."""
    model = tiny(family)
    a, b = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    doc = torch.tensor([0] * 7 + [1] * 5)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    logits = model(packed, position_ids=positions, attn_mask=mask)
    assert torch.allclose(logits[:, :7], model(a), atol=1e-5)
    assert torch.allclose(logits[:, 7:], model(b), atol=1e-5)


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="family"):
        ModelConfig(family="bert")
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)


def test_sequence_longer_than_block_size_is_refused():
    model = tiny("llama")
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny("llama").train()
    idx = torch.randint(0, 100, (2, 16))
    model(idx, idx).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(idx, idx).backward()
    for g, p in zip(plain, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
