"""``gptlab serve``: load the models, listen, say where, and run uvicorn until interrupted."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import uvicorn

from gptlab.errors import UserError
from gptlab.serve.app import create_app

DEFAULT_ARENA_DB = "arena.db"  # in the folder gptlab serve starts in, as `--arena-db arena.db`
SHUTDOWN_GRACE_S = 10  # on Ctrl-C, replies still streaming get this long to finish before they are cut


def serve(
    model_specs: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_prompt_tokens: int | None = None,
    max_new_tokens: int | None = None,
    device: str = "cpu",
    arena_specs: list[str] = (),
    arena_db: str | Path = DEFAULT_ARENA_DB,
) -> None:
    """Serve the models of ``--model DIR`` / ``--model NAME=DIR`` on ``host:port``, and with
    ``--arena NAME=DIR,...`` the arena's pages over those; the first line on stderr says where it
    listens and whether a key is required, the next where the arena is and where its votes go."""
    models = parse_models(model_specs)
    arena = parse_models([spec for specs in arena_specs for spec in specs.split(",") if spec], "--arena")
    app = create_app(
        models,
        api_key=api_key,
        max_batch=max_batch,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        device=device,
        arena=arena,
        arena_db=arena_db,
    )
    sock = listen(host, port)
    print(listening_line(sock, list(models | arena), api_key is not None), file=sys.stderr, flush=True)
    if arena:
        print(
            f"gptlab serve: the arena of {', '.join(arena)} at /arena, its leaderboard at /leaderboard; votes go to "
            f"{arena_db}",
            file=sys.stderr,
            flush=True,
        )
    try:
        config = uvicorn.Config(app, log_level="info", lifespan="on", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then raised the Ctrl-C again: the normal way out
        print("gptlab serve: stopped", file=sys.stderr)


def parse_models(specs: list[str], option: str = "--model") -> dict[str, Path]:
    """Served name -> folder. ``NAME=DIR`` names a model; a bare ``DIR`` is served under the path as
    given (as vLLM does), and so is a folder whose own path holds an '='. ``option`` is the one the
    user gave them with, for the errors."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or Path(spec).is_dir():
            name, folder = spec.rstrip("/") or spec, spec
        if not name or not folder:
            raise UserError(f"{option} {spec!r}: give a model folder, or NAME=DIR to serve it under a name")
        if name in models:
            raise UserError(f"{option}: the name {name!r} is given twice; serve each model under its own NAME=DIR")
        if not Path(folder).is_dir():
            raise UserError(f"{option} {spec}: {folder} is not a folder; give a model folder such as runs/sft/model")
        models[name] = Path(folder)
    return models


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv4 or IPv6), or one line on why there cannot be one."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections made before uvicorn starts wait in the backlog (2048: uvicorn's)
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host"
        ) from None
    return sock


def listening_line(sock: socket.socket, names: list[str], key_required: bool) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    line = f"gptlab serve: listening on http://{shown}:{port} (models: {', '.join(names)}); "
    if key_required:
        return line + "an API key is required (Authorization: Bearer KEY)"
    if ipaddress.ip_address(host).is_loopback:
        return line + "no API key required"
    return line + "no API key required: anyone who can reach this address can use the models (see --api-key)"
