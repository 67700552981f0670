"""A gptlab server for tests: ``with running_server({"tiny": folder}) as base_url: ...``, or
``with serving(create_app(...)) as base_url: ...``.

uvicorn runs the app in a thread of the test process on 127.0.0.1 and a free port; leaving the
block stops it (the scheduler threads too). Model folders: the session fixture ``tiny_model``
(tests/conftest.py) is a random two-layer GPT with a gptlab tokenizer, so it has the chat
template and the end-of-turn token, and transformers loads it as it is.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STARTUP_TIMEOUT_S = 60  # loading tiny models and starting uvicorn takes well under a second alone


@contextmanager
def running_server(models: dict[str, Path], **create_app_options) -> Iterator[str]:
    """Serve ``models`` (name -> folder) with ``create_app(models, **create_app_options)``; yields
    the base URL, ``http://127.0.0.1:PORT`` (clients add ``/v1``)."""
    from gptlab.serve import create_app

    with serving(create_app(models, **create_app_options)) as url:
        yield url


@contextmanager
def serving(app) -> Iterator[str]:
    """Serve an app made by ``create_app`` (for a test that reaches into ``app.state``); yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def twin_models(tiny_model: Path, root: Path, names: list[str]) -> dict[str, Path]:
    """Name -> a model folder of ``tiny_model``'s shape and tokenizer with weights of its own (seeded by
    its place in ``names``): models whose answers differ, as an arena's do."""
    import torch

    from gptlab.model import GPT
    from gptlab.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(tiny_model)
    config = GPT.from_pretrained(tiny_model).config
    folders = {}
    for seed, name in enumerate(names, start=1):
        torch.manual_seed(seed)
        folders[name] = root / name
        GPT(config).save_pretrained(folders[name], tokenizer=tokenizer)
    return folders


@contextmanager
def paused(app, names: list[str] | None = None) -> Iterator[Callable[[], None]]:
    """The schedulers of the served models ``names`` (default: all) wait before each step until the block
    ends or the function it yields is called: their answers hang unfinished meanwhile."""
    gate = threading.Event()
    served = app.state.server.served
    schedulers = [served[name].worker.scheduler for name in (served if names is None else names)]
    for scheduler in schedulers:
        scheduler.step = lambda step=scheduler.step: gate.wait() and step()
    try:
        yield gate.set
    finally:
        gate.set()
        for scheduler in schedulers:
            del scheduler.step  # the class's own again
