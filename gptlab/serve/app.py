"""The FastAPI app: OpenAI's ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``,
``/health``, ``/metrics`` (Prometheus text), the chat page at ``/``, and with ``arena`` models the
arena's pages and endpoints (``arena.py``).

Every refusal is in OpenAI's shape with the right status: 400 naming the parameter (FastAPI's own
validation errors and unreadable JSON included), 401 for a missing or wrong key when the server
has one (compared in constant time; ``/v1/`` paths, as vLLM, and the arena's ``/arena/api/``),
404 for an unknown model or path, 429 when a model's slots and queue are full. Bad input never reaches a 500.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest

from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.eval.backends import check_device
from gptlab.serve import arena as arena_routes
from gptlab.serve import generate, pages
from gptlab.serve.generate import Limits, ServedModel
from gptlab.serve.metrics import Metrics
from gptlab.serve.protocol import ApiError, ChatRequest, CompletionRequest, invalid
from gptlab.serve.shapes import TokenTexts
from gptlab.serve.worker import ModelWorker

log = logging.getLogger("gptlab.serve")

MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused unread (the longest prompts are far smaller)
DEFAULT_MAX_QUEUE = 256  # sequences waiting for a slot, per model, before requests get 429
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection: nobody reads the response
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", *arena_routes.ROUTES)
KEYED = ("/v1/", arena_routes.API)  # the paths that need the API key, when the server has one


def create_app(
    models: dict[str, str | os.PathLike],
    api_key: str | None = None,
    max_batch: int = 8,
    max_prompt_tokens: int | None = None,
    max_new_tokens: int | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    device: str = "cpu",
    arena: dict[str, str | os.PathLike] | None = None,
    arena_db: str | os.PathLike | None = None,
) -> FastAPI:
    """An app serving ``models`` (served name -> model folder), each loaded now on ``device`` with a
    scheduler thread that starts with the app. ``arena`` (name -> folder, at least two) adds the
    arena's pages over those models, served as the others are, its votes kept in ``arena_db``
    (SQLite). A folder that cannot be served is a ``UserError``."""
    arena = arena or {}
    check_options(models | arena, api_key, max_batch, max_prompt_tokens, max_new_tokens, max_queue)
    check_arena(models, arena, arena_db)
    device = check_device(device)
    metrics = Metrics()
    arena_state = arena_routes.open_arena(list(arena), arena_db) if arena else None
    try:
        served = {
            name: load_model(name, path, device, max_batch, max_queue, metrics)
            for name, path in (models | arena).items()
        }
    except BaseException:
        if arena_state is not None:
            arena_state.store.close()
        raise

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for model in served.values():
            model.worker.start()
        try:
            yield
        finally:
            for model in served.values():
                model.worker.stop()
            if arena_state is not None:
                arena_state.store.close()

    app = FastAPI(title="gptlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState(served, Limits(max_prompt_tokens, max_new_tokens), metrics)
    app.state.arena = arena_state
    add_error_handlers(app, metrics)
    add_routes(app)
    if arena_state is not None:
        arena_routes.add_routes(app)
    app.add_middleware(Gate, api_key=api_key, metrics=metrics)
    return app


def check_options(models, api_key, max_batch, max_prompt_tokens, max_new_tokens, max_queue) -> None:
    if not models:
        raise UserError("no model to serve: give --model DIR (or --model NAME=DIR), or --arena NAME=DIR,NAME=DIR")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty: give a key, or leave the option out to serve without one")
    for option, value, least in (
        ("--max-batch", max_batch, 1),
        ("--max-prompt-tokens", max_prompt_tokens, 1),
        ("--max-new-tokens", max_new_tokens, 1),
        ("max_queue", max_queue, 0),
    ):
        if value is not None and value < least:
            raise UserError(f"{option} must be at least {least}, got {value}")


def check_arena(models, arena, arena_db) -> None:
    """Two arena models at least, a name for one folder only, and a file for the votes."""
    if not arena:
        return
    if len(arena) < 2:
        raise UserError(
            f"--arena needs at least two models to pit against each other, got {len(arena)} ({', '.join(arena)}); "
            "give --arena NAME=DIR,NAME=DIR"
        )
    for name, folder in arena.items():
        if name in models and Path(models[name]).resolve() != Path(folder).resolve():
            raise UserError(
                f"the name {name!r} is given to two folders ({models[name]} by --model, {folder} by --arena); "
                "give one of them another NAME"
            )
    if arena_db is None:
        raise UserError("--arena needs --arena-db FILE, the SQLite file the votes go to")


def load_model(
    name: str, path: str | os.PathLike, device: str, max_batch: int, max_queue: int, metrics: Metrics
) -> ServedModel:
    engine = Engine.from_pretrained(path, device=device)
    config = engine.model.config
    if engine.tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{path}: the tokenizer has {engine.tokenizer.vocab_size} tokens but the model only {config.vocab_size}; "
            "they do not belong together"
        )
    worker = ModelWorker(name, engine, max_batch, max_queue, metrics)
    for gauge in ("gptlab_running_sequences", "gptlab_waiting_sequences"):
        metrics.set(gauge, 0, model=name)
    return ServedModel(
        name, worker, TokenTexts(engine.tokenizer), config.block_size, config.vocab_size, int(time.time())
    )


# --------------------------------------------------------------------------- errors


def error_response(error: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error_response(error, {"Retry-After": "1"} if error.status == 429 else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        return error_response(validation_problem(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        if error.status_code == 404:
            return error_response(ApiError(404, f"no such path: {request.url.path}", code="not_found"))
        return error_response(ApiError(error.status_code, str(error.detail)), getattr(error, "headers", None))

    @app.exception_handler(UserError)
    async def user_error(request, error: UserError):
        return error_response(ApiError(400, str(error)))

    @app.exception_handler(Exception)
    async def bug(request, error: Exception):  # outside the Gate's counting: count it here
        log.exception("internal error on %s", request.url.path)
        metrics.add("gptlab_requests_total", path=route_label(request.url.path), status="500")
        return error_response(ApiError(500, f"internal server error ({type(error).__name__}); see the server's log"))


def validation_problem(errors) -> ApiError:
    """FastAPI's validation errors as one 400 naming the first bad parameter."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return invalid(None, "the request body is not valid JSON")
    if not loc:
        return invalid(None, f"the request body must be a JSON object: {first['msg']}")
    param = loc[0] if first.get("type") != "extra_forbidden" else ".".join(loc)
    if first.get("type") == "extra_forbidden":
        return invalid(param, f"unknown parameter {param!r}")
    if first.get("type") == "missing":
        return invalid(param, f"missing required parameter {param!r}")
    return invalid(param, f"invalid value for {'.'.join(loc)!r}: {first['msg']}")


class Gate:
    """ASGI middleware: the API key on ``/v1/`` paths, and every response counted by path and status."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_label(scope["path"])

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.add("gptlab_requests_total", path=path, status=str(message["status"]))
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, counted)
        await self.app(scope, receive, counted)

    def refusal(self, scope) -> JSONResponse | None:
        """A 401 without the key; a 413 for a body announced over ``MAX_BODY_BYTES`` (before it is read)."""
        if self.key is not None and scope["path"].startswith(KEYED) and not self.authorized(scope):
            message = "a valid API key is required: send the header 'Authorization: Bearer KEY'"
            return error_response(ApiError(401, message, code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            message = (
                f"the request body must be at most {MAX_BODY_BYTES} bytes (Content-Length: {length.decode()[:20]})"
            )
            return error_response(ApiError(413, message, code="request_too_large"))
        return None

    def authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


def route_label(path: str) -> str:
    """The path as a metrics label: a route, or 'other' (so unknown paths cannot grow the metrics)."""
    if path in ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


# --------------------------------------------------------------------------- routes


@dataclass
class ServerState:
    """What the routes read (``app.state.server``)."""

    served: dict[str, ServedModel]
    limits: Limits
    metrics: Metrics

    def model(self, name: str) -> ServedModel:
        if name not in self.served:
            models = ", ".join(self.served)
            raise ApiError(404, f"model {name!r} is not served here; models: {models}", "model", "model_not_found")
        return self.served[name]


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    app.add_api_route("/", chat_page, methods=["GET"])


def state(http: HttpRequest) -> ServerState:
    return http.app.state.server


def card(model: ServedModel) -> dict:
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": "gptlab",
        "max_model_len": model.block_size,
    }


async def list_models(http: HttpRequest):
    return {"object": "list", "data": [card(m) for m in state(http).served.values()]}


async def get_model(name: str, http: HttpRequest):
    return card(state(http).model(name))


async def completions(body: CompletionRequest, http: HttpRequest):
    server = state(http)
    model = server.model(body.model)
    prompts = generate.completion_prompts(model, body, server.limits)
    longest = max(len(p.ids) for p in prompts)
    budget = generate.reply_budget(
        model, server.limits, longest, body.max_tokens, generate.COMPLETION_DEFAULT_MAX_TOKENS
    )
    eos = model.tokenizer.eos_id
    sequences = generate.sequences_for(
        model.worker,
        body,
        prompts,
        budget,
        stop_ids=() if eos is None else (eos,),
        logprobs=body.logprobs,
        prompt_logprobs=body.echo and body.logprobs is not None,
    )
    generate.admit(model.worker, sequences)
    if body.stream:
        return generate.event_stream(sequences, generate.completion_chunks(model, body, prompts, sequences))
    gathered = await generate.results(http, sequences)
    if gathered is None:
        return Response(status_code=CLIENT_CLOSED)
    return generate.completion_response(model, body, prompts, gathered)


async def chat_completions(body: ChatRequest, http: HttpRequest):
    server = state(http)
    model = server.model(body.model)
    prompt, sequences = generate.chat_sequences(model, body, server.limits)
    generate.admit(model.worker, sequences)
    if body.stream:
        return generate.event_stream(sequences, generate.chat_chunks(model, body, prompt, sequences))
    gathered = await generate.results(http, sequences)
    if gathered is None:
        return Response(status_code=CLIENT_CLOSED)
    return generate.chat_response(model, body, prompt, gathered)


async def health(http: HttpRequest):
    dead = [name for name, model in state(http).served.items() if not model.worker.alive]
    if dead:
        return JSONResponse({"status": "error", "stopped": dead}, status_code=503)
    return {"status": "ok"}


async def prometheus(http: HttpRequest):
    return PlainTextResponse(state(http).metrics.render(), media_type="text/plain; version=0.0.4")


async def chat_page():
    return pages.page("chat.html")
