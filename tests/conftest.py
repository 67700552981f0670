"""Fixtures built once per test session and shared by the test files. Tests only read them: a test
that needs to change one copies it into its own tmp_path first."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from gptlab.model import GPT, ModelConfig
from gptlab.tokenizer import Tokenizer
from gptlab.world import write_world
from helpers import TINY_MODEL_BLOCK, WORDS, one_thread

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture(scope="session", autouse=True)
def loopback_bypasses_proxies():
    """The tests' servers listen on 127.0.0.1: with HTTP(S)_PROXY or ALL_PROXY set, as on many company machines,
    clients (httpx under openai, urllib, requests) would send those requests to the proxy. NO_PROXY (both cases:
    urllib reads the lower-case one first) keeps loopback direct, for this process and the commands it starts."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("NO_PROXY", "no_proxy"):
            given = [host for host in os.environ.get(name, "").split(",") if host.strip()]
            mp.setenv(name, ",".join([*given, *LOOPBACK]))
        yield


@pytest.fixture(scope="module")
def on_one_thread():
    """torch on one thread for a whole module (helpers.one_thread), which asks with
    `pytestmark = pytest.mark.usefixtures("on_one_thread")`: tiny models train and decode fastest so, several threads
    mostly waiting on each other (many times slower when other processes share the cores)."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TinyWorld of `gptlab world --preset quick` (seed 0)."""
    root = tmp_path_factory.mktemp("quick_world") / "world"
    write_world(root, seed=0, preset="quick")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised two-layer GPT folder with a tokenizer trained on WORDS, sums and reversed words."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS, k=20)) for _ in range(200)]
    corpus += [f"Q: {a}+{b}=? A: {a + b}." for a in range(10, 30) for b in range(40, 45)]
    corpus += [f"{w} -> {w[::-1]}" for w in WORDS]
    tokenizer = Tokenizer.train(corpus, vocab_size=300)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=TINY_MODEL_BLOCK, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    folder = tmp_path_factory.mktemp("tiny_model") / "model"
    model.save_pretrained(folder, tokenizer=tokenizer)
    return folder
