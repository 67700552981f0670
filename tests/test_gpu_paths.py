"""Issue [gpu]'s checks: benchmarks/gpu_check.sh on a machine without CUDA, each of its benchmarks at the tiny
shape on the CPU (what they print, in which order), and the GPU paths of the loss and the loop where CUDA is."""

from __future__ import annotations

import copy
import importlib
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptlab.errors import UserError
from gptlab.logprobs import linear_cross_entropy, mean_cross_entropy
from gptlab.model import GPT, ModelConfig
from gptlab.train.loop import Runtime, TrainConfig, Trainer
from helpers import ROOT

STEPS = ["preflight", "train_step", "decode", "decode_logits", "trainer_mfu", "profile", "tests"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs every step")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_check(*args, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", ROOT / "benchmarks" / "gpu_check.sh", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


def assert_every_step_skipped(result: subprocess.CompletedProcess, folder) -> None:
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith("=== ")]
    assert said == [
        f"=== {step}: skipped: no CUDA device (torch.cuda.is_available() is false for {sys.executable})"
        for step in STEPS
    ]
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert [(r["benchmark"], r["step"]) for r in records] == [("gpu_check_step", step) for step in STEPS]
    assert all(r["skipped"].startswith("no CUDA device") for r in records)
    assert "=== tests: skipped" in (folder / "gpu.log").read_text()


@no_cuda
def test_gpu_check_without_cuda_skips_every_step_saying_why_and_exits_0(tmp_path):
    """In $OUT when set (the device tool's folder), else in a folder it names on its first line."""
    out = tmp_path / "out"
    result = gpu_check(env={"OUT": str(out)})
    assert result.stdout.splitlines()[0] == f"gpu_check: writing {out}/results.jsonl and {out}/gpu.log"
    assert_every_step_skipped(result, out)

    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    result = subprocess.run(
        ["bash", ROOT / "benchmarks" / "gpu_check.sh"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)},
    )
    named = result.stdout.splitlines()[0].split()[2]
    assert named.startswith(f"{tmp_path}/gpu_check.") and named.endswith("/results.jsonl")
    assert_every_step_skipped(result, tmp_path / named.split("/")[-2])


def run_benchmark(name: str, *args, monkeypatch, capsys, results) -> list[dict]:
    """``benchmarks/NAME.py ARGS`` in this process on one thread; the JSON lines it printed, which it also
    appended to ``results`` ($BENCHMARK_RESULTS)."""
    monkeypatch.setenv("BENCHMARK_RESULTS", str(results))
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    results.unlink(missing_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        importlib.import_module(f"benchmarks.{name}").main()
    finally:
        torch.set_num_threads(threads)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == [json.loads(line) for line in results.read_text().splitlines()]
    return printed


@pytest.fixture
def bench(monkeypatch, capsys, tmp_path):
    return lambda name, *args: run_benchmark(
        name, *args, monkeypatch=monkeypatch, capsys=capsys, results=tmp_path / "results.jsonl"
    )


def test_train_step_and_decode_print_gptlabs_figure_with_its_mfu_before_the_peers(bench):
    lines = bench("train_step", "--shape", "tiny", "--device", "cpu", "--repeats", "1", "--batch", "2", "--ours-first")
    assert [line.get("contender") for line in lines] == ["gptlab", "hf", None]
    assert all(0 < line["mfu"] <= 1 for line in lines[:2])
    assert lines[2]["ours"] == pytest.approx(lines[0]["tok_per_s"], abs=0.1) and lines[2]["mfu_ours"] == lines[0]["mfu"]
    lines = bench(
        "decode", "--shape", "tiny", "--batch-sizes", "1,2", "--new-tokens", "4", "--repeats", "1", "--ours-first"
    )
    assert [(line["benchmark"], line.get("contender")) for line in lines] == [
        ("decode_b1", "gptlab"),
        ("decode_b1", "hf dynamic"),
        ("decode_b1_vs_hf_dynamic", None),
        ("decode_b2", "gptlab"),
        ("decode_b2", "hf dynamic"),
        ("decode_b2_vs_hf_dynamic", None),
    ]
    assert all(line["mfu"] > 0 for line in lines if "contender" in line)


def test_preflight_records_the_machine_the_attention_backend_of_each_use_and_the_peak(bench):
    lines = bench("preflight", "--device", "cpu", "--shapes", "tiny")
    assert lines[0]["benchmark"] == "preflight" and lines[0]["torch"] == torch.__version__
    backends = {line["use"]: line for line in lines if line["benchmark"] == "attention_backend"}
    assert backends.keys() == {"training", "generate_b1", "generate_b64"}
    assert {line["backend"] for line in lines if line["benchmark"] == "attention_backend"} <= {"flash_cpu", "math"}
    assert lines[-1]["benchmark"] == "matmul_fp32" and lines[-1]["gflops"] > 0


def test_decode_logits_agree_with_the_math_backend_in_fp32_on_both_paths(bench):
    lines = bench(
        "decode_logits",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--shape",
        "tiny",
        "--batch-sizes",
        "2",
        "--steps",
        "8",
    )
    assert [line["path"] for line in lines] == ["cuda_graphs", "eager"]
    for line in lines:
        assert line["positions"] == 9 and line["reference_backends"] == ["math"]
        assert line["max_abs_diff"] < 1e-4 and line["argmax_agreement"] == line["decisive_agreement"] == 1.0


def test_trainer_mfu_prints_each_logged_window_then_the_median_after_the_first(bench, tmp_path):
    lines = bench(
        "trainer_mfu",
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--steps",
        "6",
        "--log-every",
        "2",
        "--batch",
        "2",
        "--no-compile",
        "--out",
        tmp_path / "run",
    )
    windows, summary = lines[:-1], lines[-1]
    assert [line["step"] for line in windows] == [2, 4, 6]
    assert windows == [
        {**r, "benchmark": "trainer_eager_tiny", "device": windows[0]["device"]}
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    ]
    assert summary["mfu"] == statistics.median(line["mfu"] for line in windows[1:]) > 0
    assert summary["tok_per_s"] == statistics.median(line["tok_per_s"] for line in windows[1:])


def test_profile_steps_gives_the_top_ops_of_a_train_step_and_both_decode_steps(bench):
    lines = bench("profile_steps", "--device", "cpu", "--train-shape", "tiny", "--decode-shape", "tiny")
    assert [line["step"] for line in lines] == ["train_step_tiny", "decode_b1_eager", "decode_b1_cuda_graph"]
    for line in lines:
        assert line["launches"] > 0 and len(line["top"]) == 12 and line["top"][0]["ms"] >= line["top"][-1]["ms"]


@cuda
def test_the_chunked_loss_on_cuda_in_bf16_agrees_with_the_plain_loss():
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4, 256, 64, device="cuda", generator=generator, requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", generator=generator, requires_grad=True)
    targets = torch.randint(0, 1000, (4, 256), device="cuda", generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = mean_cross_entropy(F.linear(hidden, weight), targets)
        expected = torch.autograd.grad(plain, (hidden, weight))
        loss = linear_cross_entropy(hidden, weight, targets, chunk_elements=1000 * 100)
        got = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, plain, rtol=1e-3, atol=0)
    for g, e in zip(got, expected):
        assert (g - e).abs().max() <= 2**-7 * e.abs().max()


@cuda
def test_on_cuda_a_non_finite_step_is_left_out_on_the_device_and_named(tmp_path):
    """CUDA's fused AdamW: the update is queued unchecked and the verdict read a step later."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    calls, given = [], []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == 3:
            given.append(copy.deepcopy(m.state_dict()))
        loss = m(batch, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    class Batches:
        def next_batch(self):
            return torch.randint(0, 50, (2, 8)).to("cuda")

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    cfg = TrainConfig(max_steps=6, batch_size=2, seq_len=8, save_every=0, eval_every=0, log_every=6, dtype="fp32")
    trainer = Trainer(model, cfg, Runtime(torch.device("cuda"), None), tmp_path, loss_fn, Batches())
    assert trainer._skips_non_finite_on_device
    with pytest.raises(UserError, match="loss became nan at step 3;"):
        trainer.fit()
    assert all(torch.equal(given[0][k], v) for k, v in model.state_dict().items())
