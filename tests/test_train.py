"""The training loop and pretraining: learning, exact resume after SIGKILL, torchrun, guards."""

import copy
import json
import math
import random
import shutil
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptlab.cli import main
from gptlab.data import iter_documents, open_shard, prepare
from gptlab.errors import UserError
from gptlab.model import GPT, ModelConfig
from gptlab.runs import RunFolder
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import ChainedOptimizer, Runtime, TrainConfig, Trainer, build_optimizer
from helpers import KILL_AFTER_FIRST_SAVE, ONE_THREAD, TORCHRUN_TWO_RANKS, gptlab_in_process, run_python

# One thread here (conftest's on_one_thread) and in the killed and torchrun runs (ONE_THREAD): a resume in this
# process then continues a killed subprocess's run bit for bit, whatever thread count the environment sets.
pytestmark = pytest.mark.usefixtures("on_one_thread")

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=64",
    "train.seq_len=32",
    "train.batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=5",
    "train.eval_batches=2",
    "train.log_every=1",
]


def story(rng: random.Random) -> str:
    """Text with learnable structure: templated sentences over a small vocabulary."""
    names = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay"]
    verbs = ["sees", "likes", "helps", "calls"]
    things = ["the cat", "a dog", "the sun", "my tree", "a boat"]
    return " ".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}." for _ in range(rng.randint(3, 8)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (root / "text.txt").write_text("\n\n".join(story(rng) for _ in range(600)) + "\n")
    tok = Tokenizer.train(iter_documents([root / "text.txt"]), vocab_size=320)
    tok.save_pretrained(root / "tok")
    prepare(root / "tok", [root / "text.txt"], root / "shards", val_fraction=0.05, workers=1)
    return root / "shards"


def pretrain_args(out: Path, shards: Path, *sets: str) -> list:
    """`gptlab pretrain` arguments for the tiny model on the test shards, plus extra --set keys."""
    args = ["pretrain", "--out", out]
    for item in (f"data.shards={shards}", *TINY, *sets):
        args += ["--set", item]
    return args


SAVED_TWICE = ("train.max_steps=20", "train.save_every=10", "train.eval_every=10")


def pretrain_here(*args) -> None:
    """`gptlab ARGS` in this process, for a run that a test only reads: its interpreter is not what is tested
    (the kills and torchrun are, and run in their own)."""
    assert main([str(a) for a in args]) == 0


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r}


def test_pretraining_drops_loss_well_below_unigram_entropy(shards, tmp_path):
    meta = json.loads((shards / "meta.json").read_text())
    stream = np.concatenate([open_shard(shards / name) for name in meta["splits"]["train"]["shards"]])
    counts = np.array(list(Counter(stream.tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    pretrain_here(
        *pretrain_args(tmp_path / "run", shards, "train.max_steps=250", "train.eval_every=250", "train.save_every=0")
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["step"] == 250 and "val_loss" in final
    assert final["val_loss"] < 0.6 * unigram_entropy, (final, unigram_entropy)
    assert records[0]["loss"] > unigram_entropy  # it started from (near-)uniform predictions
    for key in ("lr", "grad_norm", "tokens", "tok_per_s", "mfu", "peak_mem_mb"):
        assert key in final
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["model"]["n_layer"] == 2 and run["config"]["model"]["vocab_size"] == meta["vocab_size"]
    model = GPT.from_pretrained(tmp_path / "run" / "model")
    assert model.config.n_embd == 32
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()


KILL_DURING_SAVE = """
import os, signal, sys
import gptlab.checkpoint as checkpoint
calls = []
original = checkpoint.write_model_files
def write_then_die(*args, **kwargs):
    calls.append(1)
    original(*args, **kwargs)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.write_model_files = write_then_die
from gptlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> Path:
    """A 20-step run with checkpoints at steps 10 and 20. Tests copy it before changing it."""
    out = tmp_path_factory.mktemp("full") / "run"
    pretrain_here(*pretrain_args(out, shards, *SAVED_TWICE))
    assert [p.name for p in RunFolder(out).checkpoints()] == ["step-0000010", "step-0000020"]
    return out


@pytest.fixture(scope="module")
def killed(shards, tmp_path_factory) -> Path:
    """The same run SIGKILLed right after its first checkpoint. Tests copy it before resuming it."""
    out = tmp_path_factory.mktemp("killed") / "run"
    args = pretrain_args(out, shards, *SAVED_TWICE)
    assert run_python("-c", KILL_AFTER_FIRST_SAVE, *args, env=ONE_THREAD).returncode == -signal.SIGKILL
    assert [p.name for p in RunFolder(out).checkpoints()] == ["step-0000010"] and not (out / "model").exists()
    return out


def resume(capfd, out: Path, *args) -> str:
    """`gptlab pretrain --out OUT --resume ARGS` in this process; its stderr."""
    result = gptlab_in_process(capfd, "pretrain", "--out", out, "--resume", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    return result.stderr


def test_resume_after_sigkill_is_bitwise_equal(killed, uninterrupted, tmp_path, capfd):
    out = shutil.copytree(killed, tmp_path / "run")
    with (out / "metrics.jsonl").open("a") as metrics:  # as if killed halfway through a line
        metrics.write('{"step": 12, "lo')
    resume(capfd, out)
    expected, got = weights(uninterrupted / "model"), weights(out / "model")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert losses(out) == losses(uninterrupted)


needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9")


@needs_muon
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(family):
    model = GPT(ModelConfig(family=family, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(optimizer, ChainedOptimizer)
    adamw, muon = optimizer.optimizers
    name = {id(p): n for n, p in model.named_parameters()}
    on_muon = {name[id(p)] for group in muon.param_groups for p in group["params"]}
    on_adamw = [name[id(p)] for group in adamw.param_groups for p in group["params"]]
    assert on_muon == {
        n for n, p in model.named_parameters() if n.startswith("blocks.") and n.endswith(".weight") and p.dim() == 2
    }
    assert sorted(on_adamw) == sorted(set(name.values()) - on_muon)  # every other parameter, once
    assert "wte.weight" in on_adamw and (family == "gpt2" or "lm_head.weight" in on_adamw)
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    optimizer.step()
    assert all("momentum_buffer" in muon.state[p] for p in muon.param_groups[0]["params"])


@needs_muon
def test_muon_resume_after_sigkill_is_bitwise_equal(shards, tmp_path, capfd):
    muon = ("train.optimizer=muon", *SAVED_TWICE)
    pretrain_here(*pretrain_args(tmp_path / "full", shards, *muon))
    out = tmp_path / "run"
    killed = run_python("-c", KILL_AFTER_FIRST_SAVE, *pretrain_args(out, shards, *muon), env=ONE_THREAD)
    assert killed.returncode == -signal.SIGKILL
    resume(capfd, out)
    expected, got = weights(tmp_path / "full" / "model"), weights(out / "model")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert losses(out) == losses(tmp_path / "full")
    record = (out / "run.json").read_text()
    mixed = gptlab_in_process(
        capfd, "pretrain", "--out", out, "--resume", "--set", "train.optimizer=adamw", "--set", "train.max_steps=30"
    )
    assert mixed.returncode == 2 and "holds muon's state, but train.optimizer=adamw" in mixed.stderr.splitlines()[-1]
    assert (out / "run.json").read_text() == record  # a later plain --resume still finds the run's own config


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(shards, uninterrupted, tmp_path, capfd):
    out = tmp_path / "run"
    args = pretrain_args(out, shards, *SAVED_TWICE)
    killed = run_python("-c", KILL_DURING_SAVE, *args, env=ONE_THREAD)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in RunFolder(out).checkpoints()] == ["step-0000010"]  # the half-written step 20 is invisible
    resume(capfd, out)
    expected, got = weights(uninterrupted / "model"), weights(out / "model")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(uninterrupted, tmp_path, capfd):
    out = shutil.copytree(uninterrupted, tmp_path / "run")
    newest = out / "checkpoints" / "step-0000020" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    (out / "model" / "model.safetensors").unlink()  # so the weights compared below are the resumed run's
    assert "step-0000020 cannot be loaded" in resume(capfd, out)
    expected, got = weights(uninterrupted / "model"), weights(out / "model")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def assert_same_training(run: Path, reference: Path) -> None:
    """``run`` logged the losses and gradient norms of ``reference`` and ended with its weights, up to the
    float rounding in which two ranks and one process differ."""
    single, distributed = losses(reference), losses(run)
    assert single.keys() == distributed.keys()
    for step in single:
        assert abs(single[step] - distributed[step]) < 1e-4, (step, single[step], distributed[step])
    norms = [losses(r, "grad_norm") for r in (reference, run)]
    assert norms[0].keys() == norms[1].keys()
    assert all(norms[1][step] == pytest.approx(norms[0][step], rel=1e-3) for step in norms[0]), norms
    expected, got = weights(reference / "model"), weights(run / "model")
    assert all(torch.allclose(expected[k], got[k], atol=1e-4) for k in expected)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(shards, uninterrupted, tmp_path, parallelism):
    out = tmp_path / parallelism
    args = pretrain_args(out, shards, f"train.parallelism={parallelism}", *SAVED_TWICE)
    result = run_python(*TORCHRUN_TWO_RANKS, "-m", "gptlab", *args, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(out, uninterrupted)


def kill_two_ranks_after_first_save(out: Path, shards: Path, parallelism: str) -> None:
    """Train on two torchrun ranks until the first checkpoint is written, then SIGKILL both."""
    script = out.parent / "kill_after_first_save.py"
    script.write_text(KILL_AFTER_FIRST_SAVE)
    args = pretrain_args(out, shards, f"train.parallelism={parallelism}", *SAVED_TWICE)
    killed = run_python(*TORCHRUN_TWO_RANKS, script, *args, env=ONE_THREAD)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert [p.name for p in RunFolder(out).checkpoints()] == ["step-0000010"] and not (out / "model").exists()


@pytest.mark.slow
def test_a_ddp_run_killed_after_a_save_resumes_under_ddp(shards, uninterrupted, tmp_path):
    out = tmp_path / "run"
    kill_two_ranks_after_first_save(out, shards, "ddp")
    resumed = run_python(*TORCHRUN_TWO_RANKS, "-m", "gptlab", "pretrain", "--out", out, "--resume", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert_same_training(out, uninterrupted)


@pytest.mark.slow
def test_a_checkpoint_written_under_fsdp_resumes_in_one_process(shards, uninterrupted, tmp_path, capfd):
    """Two FSDP ranks gather their shards into a full checkpoint (optimizer state keyed by parameter name);
    one process reads it back and finishes the run as if it had run alone."""
    out = tmp_path / "run"
    kill_two_ranks_after_first_save(out, shards, "fsdp")
    written, expected = (weights(run / "checkpoints" / "step-0000010") for run in (out, uninterrupted))
    assert written.keys() == expected.keys()
    assert all(torch.allclose(written[k], expected[k], atol=1e-4) for k in expected)
    resume(capfd, out)
    assert_same_training(out, uninterrupted)


@pytest.mark.slow
def test_fsdp_resumes_a_one_process_checkpoint(killed, uninterrupted, tmp_path):
    """A checkpoint saved without FSDP (optimizer state keyed by index) resumes on 2 FSDP ranks."""
    out = shutil.copytree(killed, tmp_path / "run")
    result = run_python(
        *TORCHRUN_TWO_RANKS,
        "-m",
        "gptlab",
        "pretrain",
        "--out",
        out,
        "--resume",
        "--set",
        "train.parallelism=fsdp",
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single, resumed = losses(uninterrupted), losses(out)
    assert single.keys() == resumed.keys()
    assert all(abs(single[s] - resumed[s]) < 1e-4 for s in single), (single, resumed)


class Batches:
    """A batch source for the Trainer tests: ``make()`` gives each batch; there is nothing to resume."""

    def __init__(self, make):
        self.make = make

    def next_batch(self):
        return self.make()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_grad_norm_is_logged_before_clipping_and_the_optimizer_gets_the_clipped_gradients(tmp_path, grad_clip):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    batch = torch.randint(0, 50, (2, 8))
    reference = copy.deepcopy(model)
    reference(batch, batch).backward()
    grads = [p.grad for p in reference.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    assert norm > 0.05  # so that the clipped case clips
    scale = min(1.0, grad_clip / norm) if grad_clip > 0 else 1.0

    cfg = TrainConfig(max_steps=1, batch_size=2, seq_len=8, eval_every=0, log_every=1, grad_clip=grad_clip)
    trainer = Trainer(
        model, cfg, Runtime(torch.device("cpu"), None), tmp_path, lambda m, b: m(b, b), Batches(lambda: batch)
    )
    stepped = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda: (stepped.append([p.grad.clone() for p in model.parameters()]), step())
    trainer.fit()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["grad_norm"] == pytest.approx(norm, rel=1e-5)
    for got, expected in zip(stepped[0], grads):
        assert torch.allclose(got, expected * scale, rtol=1e-5, atol=1e-8)


def test_a_non_finite_gradient_stops_the_run_before_the_update(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    before = copy.deepcopy(model.state_dict())

    def loss_fn(m, batch):  # a finite loss (sqrt(0) = 0) whose gradient is not (its slope at 0 is infinite)
        return m(batch, batch) + torch.sqrt(m.lm_head.weight[0, 0] * 0)

    cfg = TrainConfig(max_steps=3, batch_size=2, seq_len=8, eval_every=0, log_every=1, grad_clip=0.0)
    random_batches = Batches(lambda: torch.randint(0, 50, (2, 8)))
    trainer = Trainer(model, cfg, Runtime(torch.device("cpu"), None), tmp_path, loss_fn, random_batches)
    with pytest.raises(UserError, match="gradient norm became (nan|inf) at step 1"):
        trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))

    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        loss = m(batch, batch)
        return loss * float("nan") if len(calls) == 7 else loss

    cfg = TrainConfig(max_steps=10, batch_size=2, seq_len=8, save_every=5, eval_every=0, log_every=1)
    random_batches = Batches(lambda: torch.randint(0, 50, (2, 8)))
    trainer = Trainer(model, cfg, Runtime(torch.device("cpu"), None), tmp_path, loss_fn, random_batches)
    with pytest.raises(UserError, match="at step 7") as info:
        trainer.fit()
    assert "step-0000005" in str(info.value) and "\n" not in str(info.value)
    assert [p.name for p in RunFolder(tmp_path).checkpoints()] == ["step-0000005"]
    assert GPT.from_pretrained(tmp_path / "checkpoints" / "step-0000005").config.n_embd == 16


class FusedAdamW(torch.optim.AdamW):
    """The loop's AdamW fused whatever the device, as it is on CUDA (torch fuses it on the CPU too)."""

    def __init__(self, *args, fused=None, **kwargs):
        super().__init__(*args, fused=True, **kwargs)


def nan_at_call(call: int, snapshots: list):
    """A loss function whose ``call``-th loss is NaN; it keeps the weights it was handed at that call."""
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == call:
            snapshots.append(copy.deepcopy(m.state_dict()))
        loss = m(batch, batch)
        return loss * float("nan") if len(calls) == call else loss

    return loss_fn


@pytest.mark.parametrize(
    ("save_every", "kept"),
    [
        pytest.param(1, ["step-0000003", "step-0000004"], id="found-before-the-save-of-step-5"),
        pytest.param(0, [], id="found-in-step-6s-first-micro-step"),
    ],
)
def test_a_fused_adamw_queues_the_update_unchecked_leaves_a_non_finite_one_out_and_stops_the_run(
    tmp_path, monkeypatch, save_every, kept
):
    """With a fused AdamW the host queues each update without waiting for its loss and gradient norm: the
    optimizer leaves a non-finite step out on the device, and the run stops with that step's number once the
    next step's work is queued, or before anything of it is saved, with the weights that step was given."""
    monkeypatch.setattr(torch.optim, "AdamW", FusedAdamW)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    given: list[dict] = []
    cfg = TrainConfig(max_steps=10, batch_size=2, seq_len=8, save_every=save_every, eval_every=0, log_every=10)
    random_batches = Batches(lambda: torch.randint(0, 50, (2, 8)))
    trainer = Trainer(model, cfg, Runtime(torch.device("cpu"), None), tmp_path, nan_at_call(5, given), random_batches)
    assert trainer._skips_non_finite_on_device
    steps = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda: (steps.append(trainer.optimizer.found_inf.item()), step())
    with pytest.raises(UserError, match="loss became nan at step 5;"):
        trainer.fit()
    assert steps == [0.0, 0.0, 0.0, 0.0, 1.0]  # the fifth update was queued, flagged
    assert all(torch.equal(given[0][k], v) for k, v in model.state_dict().items())
    assert [p.name for p in RunFolder(tmp_path).checkpoints()] == kept


def test_a_fused_adamw_trains_the_same_queuing_its_updates_as_waiting_for_each_check(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", FusedAdamW)
    results = []
    for deferred in (True, False):
        monkeypatch.setattr(Trainer, "_skips_non_finite_on_device", deferred)
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
        cfg = TrainConfig(max_steps=6, batch_size=2, seq_len=8, save_every=0, eval_every=0, log_every=1)
        batches = Batches(lambda: torch.randint(0, 50, (2, 8)))
        Trainer(
            model, cfg, Runtime(torch.device("cpu"), None), tmp_path / str(deferred), lambda m, b: m(b, b), batches
        ).fit()
        results.append((losses(tmp_path / str(deferred)), model.state_dict()))
    (deferred_losses, deferred_weights), (waited_losses, waited_weights) = results
    assert deferred_losses == waited_losses and len(deferred_losses) == 6
    assert all(torch.equal(deferred_weights[k], waited_weights[k]) for k in waited_weights)


def test_gradient_accumulation_equals_one_big_batch(shards, tmp_path):
    common = ("train.max_steps=5", "train.save_every=0", "train.eval_every=0")
    pretrain_here(*pretrain_args(tmp_path / "big", shards, *common))
    pretrain_here(*pretrain_args(tmp_path / "accum", shards, *common, "train.micro_batch_size=2"))
    big, accum = losses(tmp_path / "big"), losses(tmp_path / "accum")
    assert all(math.isclose(big[s], accum[s], abs_tol=1e-5) for s in big)
    for name, tensor in weights(tmp_path / "big" / "model").items():
        assert torch.allclose(tensor, weights(tmp_path / "accum" / "model")[name], atol=1e-5)


TRAIN_COMPILED = """
import json, sys
from pathlib import Path
import torch
import gptlab.train.loop as loop
from gptlab.model import GPT, ModelConfig
from gptlab.train.loop import TrainConfig, Trainer, cleanup_runtime, setup_runtime

loop.peak_flops = lambda device: None  # no MFU: spares timing the CPU's matmuls
# Dynamo and AOTAutograd trace as they do for inductor, without its C++ compile: the wrapping is what is tested.
compiled = []
torch_compile = torch.compile
def traced(module, *args, **kwargs):
    compiled.append(type(getattr(module, "__self__", module)).__name__)  # Module.compile passes its bound _call_impl
    return torch_compile(module, *args, backend="aot_eager", **kwargs)
torch.compile = traced

class Batches:  # rank r takes rows 4r..4r+3 of each global batch
    def __init__(self, rank):
        self.rank, self.calls = rank, 0
    def next_batch(self):
        self.calls += 1
        return torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(self.calls))[4 * self.rank :][:4]
    def state_dict(self):
        return {}
    def load_state_dict(self, state):
        pass

out, report = Path(sys.argv[1]), {}
for name, settings in {
    "ddp": {}, "ddp_compiled": {"compile": True}, "fsdp": {"parallelism": "fsdp"},
    "fsdp_compiled": {"parallelism": "fsdp", "compile": True}, "fsdp_bf16": {"parallelism": "fsdp", "dtype": "bf16"},
}.items():
    cfg = TrainConfig(max_steps=4, batch_size=8, seq_len=8, eval_every=0, log_every=1, save_every=0, device="cpu",
                      **settings)
    runtime = setup_runtime(cfg)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    seen = set()
    model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, args: seen.add(str(m.weight.dtype)))
    compiled.clear()
    trainer = Trainer(model, cfg, runtime, out / name, lambda m, b: m(b, b), Batches(runtime.rank))
    trainer.fit()
    report[name] = {"compiled": list(compiled), "called": type(trainer.wrapped).__name__,
                    "forward_dtypes": sorted(seen), "stored_dtype": str(model.blocks[0].attn.qkv.weight.dtype)}
if runtime.is_main:
    (out / "report.json").write_text(json.dumps(report))
cleanup_runtime(runtime)
"""


@pytest.mark.slow
def test_compile_wraps_ddp_and_fsdps_blocks_and_fsdp_in_bf16_gathers_bf16_weights(tmp_path):
    """train.compile under torchrun compiles what PyTorch advises: the DDP-wrapped model (its gradient buckets
    then split the graph) and, under FSDP2, each sharded block in place (the all-gathers stay outside the
    graphs); both train as uncompiled. A bf16 FSDP run gathers bf16 weights for the forward (and reduces
    gradients in fp32) while its stored weights stay fp32."""
    script = tmp_path / "train_compiled.py"
    script.write_text(TRAIN_COMPILED)
    run_python(*TORCHRUN_TWO_RANKS, script, tmp_path, check=True, env=ONE_THREAD)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ddp_compiled"]["compiled"] == ["DistributedDataParallel"]
    assert (
        report["ddp_compiled"]["called"] == "OptimizedModule" and report["ddp"]["called"] == "DistributedDataParallel"
    )
    assert report["fsdp_compiled"]["compiled"] == ["FSDPBlock", "FSDPBlock"]
    assert report["ddp"]["compiled"] == report["fsdp"]["compiled"] == []
    for parallelism in ("ddp", "fsdp"):
        plain, compiled = losses(tmp_path / parallelism), losses(tmp_path / f"{parallelism}_compiled")
        assert plain.keys() == compiled.keys() == {1, 2, 3, 4}
        assert all(compiled[s] == pytest.approx(plain[s], rel=1e-6) for s in plain), (plain, compiled)
    assert report["fsdp_bf16"]["forward_dtypes"] == ["torch.bfloat16"]
    assert report["fsdp_bf16"]["stored_dtype"] == report["fsdp"]["stored_dtype"] == "torch.float32"
    assert report["fsdp"]["forward_dtypes"] == ["torch.float32"]


TRAIN_WITH_METRICS = """
import sys
from pathlib import Path
import torch
import gptlab.train.loop as loop
from gptlab.model import GPT, ModelConfig
from gptlab.train.loop import Runtime, TrainConfig, Trainer, cleanup_runtime, setup_runtime

loop.peak_flops = lambda device: None  # no MFU: spares timing the CPU's matmuls

def global_batch(step):
    return torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(step))

class Slices:  # rank r's micro-step k of each step takes rows (r * accum + k) * micro onwards of its global batch
    def __init__(self, rank, micro, accum):
        self.rank, self.micro, self.accum, self.calls = rank, micro, accum, 0
    def next_batch(self):
        step, k = divmod(self.calls, self.accum)
        self.calls += 1
        start = (self.rank * self.accum + k) * self.micro
        return global_batch(step)[start:start + self.micro]
    def state_dict(self):
        return {}
    def load_state_dict(self, state):
        pass

def loss_fn(model, batch):
    metrics = {"rewards/chosen": (batch.float() / 50).mean(), "tokens/below_10": (batch < 10).float().sum(1).mean()}
    return model(batch, batch), metrics

def train(runtime, micro, out):
    cfg = TrainConfig(max_steps=5, batch_size=8, micro_batch_size=micro, seq_len=8, eval_every=0, log_every=2,
                      save_every=0, device="cpu")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    micro, accum = runtime.micro_batching(cfg)
    Trainer(model, cfg, runtime, out, loss_fn, Slices(runtime.rank, micro, accum)).fit()

out = Path(sys.argv[1])
ranks = setup_runtime(TrainConfig(device="cpu"))
for micro in (4, 2):  # two ranks: 4 rows each in one micro-step, and 2 rows each in two
    train(ranks, micro, out / f"ranks2_micro{micro}")
# One process, no all-reduce (run here, as one launch is cheaper than two): all 8 rows at once, and in 4 micro-steps.
if ranks.is_main:
    for micro in (8, 2):
        train(Runtime(torch.device("cpu"), None), micro, out / f"ranks1_micro{micro}")
cleanup_runtime(ranks)
"""


@pytest.mark.slow
def test_stage_metrics_are_averaged_over_micro_steps_ranks_and_the_log_window(tmp_path):
    """A loss_fn's (loss, metrics): each metric is logged as its mean over the global batch and the log window,
    however the batch is split into micro-steps and ranks."""
    script = tmp_path / "train_with_metrics.py"
    script.write_text(TRAIN_WITH_METRICS)
    run_python(*TORCHRUN_TWO_RANKS, script, tmp_path, check=True, env=ONE_THREAD)

    def expected(step: int) -> dict[str, float]:  # the closed form over the step's whole global batch
        rows = torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(step)).double()
        below_10 = (rows < 10).double().sum(1)  # per row
        return {"rewards/chosen": (rows / 50).mean().item(), "tokens/below_10": below_10.mean().item()}

    windows = {2: [0, 1], 4: [2, 3], 5: [4]}  # log_every=2 over 5 steps; the last window holds one step
    runs = [tmp_path / name for name in ("ranks1_micro8", "ranks1_micro2", "ranks2_micro4", "ranks2_micro2")]
    for name in ("rewards/chosen", "tokens/below_10"):
        want = {s: sum(expected(i)[name] for i in steps) / len(steps) for s, steps in windows.items()}
        for run in runs:
            got = losses(run, name)
            assert got.keys() == want.keys(), (run, got)
            assert all(got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6) for s in want), (run, name, got, want)
    single = losses(runs[0])
    assert single.keys() == windows.keys()
    for run in runs[1:]:  # the loss beside them is the same one
        assert all(abs(losses(run)[s] - single[s]) < 1e-4 for s in single), (run, losses(run), single)
