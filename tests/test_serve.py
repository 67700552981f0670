"""gptlab serve through the official openai client and raw HTTP: models, completions and chat (plain,
streamed, n, stop, seed, token ids, echoed log-probs equal to the model's and transformers'), every
error in OpenAI's shape, many clients at once, disconnects, the command line, and `gptlab eval
--backend openai` against the server equal to the in-process backend."""

from __future__ import annotations

import csv
import gc
import http.client
import json
import math
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
import torch

from gptlab.cli import main as gptlab_main
from gptlab.engine import Engine, batching
from gptlab.eval import GenerationRequest, GptlabBackend, OpenAIBackend
from gptlab.tokenizer import Tokenizer
from helpers import ROOT, WORDS, assert_user_error, gptlab_in_process, write_jsonl
from serving import running_server

MAX_PROMPT_TOKENS = 300  # under the tiny model's window of 384, so the server's own limit can be hit
MAX_NEW_TOKENS = 320
WAIT_S = 60  # for the server's state to settle (slots freed); a hang fails instead of stalling


@pytest.fixture(scope="module")
def base_url(tiny_model: Path):
    models = {"tiny": tiny_model, "twin": tiny_model}
    with running_server(models, max_prompt_tokens=MAX_PROMPT_TOKENS, max_new_tokens=MAX_NEW_TOKENS) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model)


def call(base_url: str, method: str, path: str, body=None, raw: bytes | None = None, headers=None):
    """(status, parsed JSON or text) of one raw HTTP request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base_url + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metric(base_url: str, name: str, **labels) -> float:
    """One sample of /metrics (0 when absent)."""
    text = call(base_url, "GET", "/metrics")[1]
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def open_stream(base_url: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streamed completion on a raw connection, its first event read: the sequence holds a slot."""
    address = urlsplit(base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    connection.request(
        "POST", "/v1/completions", json.dumps(body | {"stream": True}), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: {")
    return connection, response


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def client_args(body: dict) -> dict:
    """A raw body as the openai client's arguments: vLLM's extensions go in extra_body."""
    extensions = {k: v for k, v in body.items() if k in ("top_k", "ignore_eos", "repetition_penalty")}
    return {k: v for k, v in body.items() if k not in extensions} | {"extra_body": extensions}


LONG = {"model": "tiny", "prompt": "alpha beta", "max_tokens": 300, "temperature": 0, "ignore_eos": True}


# --------------------------------------------------------------------------- models and chat


def test_models_are_listed(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "twin"]
    model = client.models.retrieve("twin")
    assert model.id == "twin" and model.owned_by == "gptlab" and model.model_extra["max_model_len"] == 384


def test_chat_plain_and_streamed_give_the_same_greedy_reply_as_the_engine(base_url, client, tiny_model, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "alpha beta gamma?"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    # The chat template with the generation prompt, the reply up to <|end|> or EOS: as the engine makes it.
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    stops = [tok.end_id, tok.eos_id]
    (tokens,) = Engine.from_pretrained(tiny_model).generate([prompt], 12, temperature=0, stop_ids=stops)
    assert plain.usage.prompt_tokens == len(prompt) and plain.usage.completion_tokens == len(tokens)
    reply = tok.decode([t for t in tokens if t not in stops], skip_special_tokens=True)
    assert plain.choices[0].message.content == reply
    assert plain.choices[0].finish_reason == ("stop" if tokens[-1] in stops else "length")
    # On the wire: server-sent events ending with data: [DONE].
    body = {"model": "tiny", "messages": messages, "max_tokens": 3, "stream": True}
    status, text = call(base_url, "POST", "/v1/chat/completions", body)
    events = [line for line in text.split("\n\n") if line]
    assert status == 200 and all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_n_choices_are_indexed_and_seeded_draws_differ(client):
    messages = [{"role": "user", "content": "beta?"}]
    sampled = client.chat.completions.create(model="tiny", messages=messages, n=2, temperature=1, seed=1, max_tokens=8)
    assert [c.index for c in sampled.choices] == [0, 1]
    assert sampled.choices[0].message.content != sampled.choices[1].message.content
    assert 0 < sampled.usage.completion_tokens <= 16
    greedy = client.chat.completions.create(model="tiny", messages=messages, n=2, temperature=0, max_tokens=8)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_seed_reproduces_a_sample(client):
    def sample(seed):
        body = dict(model="tiny", prompt="gamma delta", temperature=1.0, top_p=0.95, top_k=50, max_tokens=12)
        return client.completions.create(seed=seed, **client_args(body)).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_string_ends_the_text_before_it(client):
    body = client_args(dict(model="tiny", prompt="epsilon zeta eta", temperature=0, max_tokens=24, ignore_eos=True))
    full = client.completions.create(**body).choices[0]
    assert full.finish_reason == "length"
    text = full.text
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    cut = client.completions.create(stop=[stop, "never appears"], **body).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], temperature=0, max_tokens=20, stop=stop
    )
    assert stop not in chat.choices[0].message.content


def test_completions_take_token_ids_and_lists_of_prompts(client, tok):
    texts = ["alpha beta", "iota kappa lambda mu"]
    ids = [tok.encode(t) for t in texts]
    by_text = client.completions.create(model="tiny", prompt=texts, temperature=0, max_tokens=6)
    by_ids = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=6)
    one = client.completions.create(model="tiny", prompt=ids[1], temperature=0, max_tokens=6)
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices]
    assert by_ids.choices[1].text == one.choices[0].text
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    two_each = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=6, n=2)
    assert [c.index for c in two_each.choices] == [0, 1, 2, 3]
    assert [c.text for c in two_each.choices] == [by_ids.choices[i // 2].text for i in range(4)]


def test_echoed_logprobs_equal_the_models_and_transformers(client, tiny_model, tok):
    text = "alpha beta gamma -> ammag 12+35"
    out = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=3, temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    ids = tok.encode(text)
    assert choice.text == text and choice.finish_reason == "length" and out.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    engine = Engine.from_pretrained(tiny_model)
    with torch.inference_mode():
        ours = engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    expected = [ours[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_ids = AutoTokenizer.from_pretrained(tiny_model)(text)["input_ids"]
    assert hf_ids == ids
    with torch.inference_mode():
        theirs = AutoModelForCausalLM.from_pretrained(tiny_model)(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert lp.token_logprobs[1:] == pytest.approx([theirs[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)
    # The chosen token is among each position's alternatives, with the 3 most likely; offsets split the text.
    for i in range(1, len(ids)):
        top = ours[i - 1].topk(3)
        assert set(lp.top_logprobs[i]) >= {tok.decode([t]) for t in top.indices.tolist()} | {lp.tokens[i]}
    assert lp.text_offset[0] == 0 and all(text[o:].startswith(t) for o, t in zip(lp.text_offset[1:], lp.tokens[1:]))
    generated = client.completions.create(model="tiny", prompt=text, max_tokens=4, echo=True, logprobs=0, temperature=0)
    assert generated.choices[0].text.startswith(text) and len(generated.choices[0].logprobs.tokens) == len(ids) + 4


def test_streamed_completions_join_to_the_plain_one(client):
    body = dict(model="tiny", prompt=["kappa mu", "eta"], n=2, temperature=0, max_tokens=9, echo=True, logprobs=1)
    plain = client.completions.create(**body)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **body))
    for choice in plain.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text and mine[-1].finish_reason == choice.finish_reason
        joined = [t for c in mine if c.logprobs for t in c.logprobs.tokens]
        assert joined == choice.logprobs.tokens
        offsets = [o for c in mine if c.logprobs for o in c.logprobs.text_offset]
        assert offsets == choice.logprobs.text_offset
    assert chunks[-1].usage == plain.usage


def test_chat_logprobs(client):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "mu"}],
        temperature=0,
        max_completion_tokens=5,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens <= 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)


# --------------------------------------------------------------------------- errors


def chat_body(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} | fields


def completion_body(**fields) -> dict:
    return {"model": "tiny", "prompt": "alpha"} | fields


BAD_REQUESTS = [
    ("/v1/completions", completion_body(temperature="hot"), "temperature"),
    ("/v1/completions", completion_body(temperature=-1), "temperature"),
    ("/v1/completions", completion_body(top_p=0), "top_p"),
    ("/v1/completions", completion_body(n=0), "n"),
    ("/v1/completions", completion_body(n=True), "n"),
    ("/v1/completions", completion_body(max_tokens=-1), "max_tokens"),
    ("/v1/completions", completion_body(max_tokens=MAX_NEW_TOKENS + 1), "max_tokens"),
    ("/v1/completions", completion_body(max_tokens=MAX_NEW_TOKENS, prompt=" ".join(WORDS * 6)), "max_tokens"),
    ("/v1/completions", completion_body(logprobs=21), "logprobs"),
    ("/v1/completions", completion_body(seed=2**70), "seed"),
    ("/v1/completions", completion_body(temprature=0.5), "temprature"),
    ("/v1/completions", completion_body(prompt=[]), "prompt"),
    ("/v1/completions", completion_body(prompt=[[]]), "prompt"),
    ("/v1/completions", completion_body(prompt=[1, "a"]), "prompt"),
    ("/v1/completions", completion_body(prompt=[10**6]), "prompt"),
    ("/v1/completions", completion_body(prompt=" ".join(WORDS * 40)), "prompt"),  # over --max-prompt-tokens
    ("/v1/completions", completion_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("/v1/completions", completion_body(stream_options={"include_usage": True}), "stream_options"),
    ("/v1/completions", completion_body(presence_penalty=0.5), "presence_penalty"),
    ("/v1/completions", {"prompt": "alpha"}, "model"),
    ("/v1/chat/completions", chat_body(messages=[]), "messages"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user"}]), "messages.0.content"),
    ("/v1/chat/completions", chat_body(top_logprobs=2), "top_logprobs"),
    ("/v1/chat/completions", chat_body(max_tokens=0), "max_tokens"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "alpha " * 400}]), "messages"),
]


def assert_error(status: int, body, expected_status: int, param: str | None = None) -> dict:
    assert status == expected_status, (status, body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "\n" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS, ids=[p for _, _, p in BAD_REQUESTS])
def test_an_invalid_parameter_is_a_400_naming_it(base_url, path, body, param):
    error = assert_error(*call(base_url, "POST", path, body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_bodies_that_are_not_json_objects_are_400s(base_url):
    assert_error(*call(base_url, "POST", "/v1/completions", raw=b"{not json"), 400)
    assert_error(*call(base_url, "POST", "/v1/completions", raw=b"[1, 2]"), 400)
    assert_error(*call(base_url, "POST", "/v1/chat/completions", raw=b"\xff\xfe"), 400)
    assert_error(*call(base_url, "POST", "/v1/completions", raw=b'{"model": "tiny", "prompt": "a", "top_p": NaN}'), 400)


def test_a_body_over_the_limit_is_refused_unread(base_url):
    address = urlsplit(base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(1 << 30))
    connection.endheaders()  # and no body: the answer comes without it
    response = connection.getresponse()
    error = assert_error(response.status, json.loads(response.read()), 413)
    assert "at most" in error["message"]
    connection.close()


def test_unknown_models_and_paths_are_404s(base_url, client):
    assert_error(*call(base_url, "POST", "/v1/completions", completion_body(model="gpt-4")), 404, "model")
    assert_error(*call(base_url, "POST", "/v1/chat/completions", chat_body(model="gpt-4")), 404, "model")
    assert_error(*call(base_url, "GET", "/v1/models/gpt-4"), 404, "model")
    assert_error(*call(base_url, "POST", "/v1/embeddings", {"model": "tiny", "input": "x"}), 404)
    assert_error(*call(base_url, "GET", "/nowhere"), 404)
    assert_error(*call(base_url, "GET", "/v1/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="alpha", max_tokens=-1)
    assert refused.value.status_code == 400 and "max_tokens" in str(refused.value)
    assert metric(base_url, "gptlab_requests_total", path="/v1/completions", status="500") == 0


def test_api_key_is_required_when_set(tiny_model):
    with running_server({"tiny": tiny_model}, api_key="s3cret") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = assert_error(*call(url, "GET", "/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
        assert_error(*call(url, "POST", "/v1/completions", completion_body()), 401)
        assert call(url, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(url, "GET", "/health")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].finish_reason


def test_a_full_server_answers_429_and_serves_again_after(tiny_model):
    with running_server({"tiny": tiny_model}, max_batch=1, max_queue=0) as url:
        connection, _ = open_stream(url, LONG)
        error = assert_error(*call(url, "POST", "/v1/completions", completion_body(max_tokens=1)), 429)
        assert error["type"] == "rate_limit_error"
        connection.close()
        wait_for(lambda: metric(url, "gptlab_running_sequences", model="tiny") == 0, "the slot to be freed")
        assert call(url, "POST", "/v1/completions", completion_body(max_tokens=1))[0] == 200


# --------------------------------------------------------------------------- many clients


def live_objects() -> dict[str, int]:
    """The scheduler's sequences and the tensors alive in this process (the server runs in it)."""
    gc.collect()
    objects = gc.get_objects()
    return {
        "sequences": sum(type(o) is batching._Sequence for o in objects),  # type(): no lazy module attributes read
        "tensors": sum(issubclass(type(o), torch.Tensor) for o in objects),
    }


def test_32_clients_at_once_get_their_sequential_outputs(base_url, client):
    rng = random.Random(0)
    requests = []
    for i in range(64):
        body = {"model": "tiny", "max_tokens": rng.randint(1, 16)}
        body |= {"temperature": 0} if i % 4 else {"temperature": 1.0, "seed": i}
        if i % 2:
            body["prompt"] = words(rng, rng.randint(1, 60))
        else:
            body["messages"] = [{"role": "user", "content": words(rng, rng.randint(1, 30))}]
        requests.append(body)

    def ask(body: dict):
        status, answer = call(base_url, "POST", "/v1/completions" if "prompt" in body else "/v1/chat/completions", body)
        assert status == 200, answer
        choice = answer["choices"][0]
        return choice.get("text", choice.get("message", {}).get("content")), choice["finish_reason"]

    sequential = [ask(body) for body in requests]
    answers: dict[int, tuple] = {}
    failures = []

    def worker(k: int) -> None:
        try:
            for i in (k, k + 32):
                answers[i] = ask(requests[i])
        except Exception as e:  # a thread cannot fail the test: it reports here
            failures.append(repr(e))

    def burst() -> None:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not failures, failures[:3]
        assert [answers[i] for i in range(64)] == sequential

    burst()
    held = live_objects()
    burst()  # memory flat across rounds: a second burst leaves no more sequences or tensors alive than the first
    assert live_objects() == held and held["sequences"] == 0
    wait_for(lambda: metric(base_url, "gptlab_running_sequences", model="tiny") == 0, "running sequences back to 0")
    assert metric(base_url, "gptlab_waiting_sequences", model="tiny") == 0
    counted = [line for line in call(base_url, "GET", "/metrics")[1].splitlines() if "requests_total{" in line]
    assert not [line for line in counted if 'status="5' in line]


def test_a_new_request_starts_while_others_decode(base_url, client):
    finished_long = []

    def long_stream():
        for chunk in client.completions.create(stream=True, **client_args(LONG)):
            if chunk.choices[0].finish_reason:
                finished_long.append(time.monotonic())

    threads = [threading.Thread(target=long_stream) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(base_url, "gptlab_running_sequences", model="tiny") == 2, "two long sequences running")
    short = client.completions.create(model="tiny", prompt="beta", max_tokens=2, temperature=0)
    short_done = time.monotonic()
    for t in threads:
        t.join(timeout=600)
    assert short.choices[0].finish_reason and len(finished_long) == 2
    assert short_done < min(finished_long)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(base_url):
    aborted = metric(base_url, "gptlab_sequences_finished_total", finish_reason="abort", model="tiny")
    connection, response = open_stream(base_url, LONG)
    assert metric(base_url, "gptlab_running_sequences", model="tiny") == 1
    response.close()
    connection.close()
    wait_for(lambda: metric(base_url, "gptlab_running_sequences", model="tiny") == 0, "the slot to be freed")
    assert metric(base_url, "gptlab_sequences_finished_total", finish_reason="abort", model="tiny") == aborted + 1


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(base_url):
    aborted = metric(base_url, "gptlab_sequences_finished_total", finish_reason="abort", model="tiny")
    failed = metric(base_url, "gptlab_requests_total", path="/v1/completions", status="500")
    address = urlsplit(base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    connection.request("POST", "/v1/completions", json.dumps(LONG), {"Content-Type": "application/json"})
    wait_for(lambda: metric(base_url, "gptlab_running_sequences", model="tiny") == 1, "the request to run")
    connection.close()
    wait_for(lambda: metric(base_url, "gptlab_running_sequences", model="tiny") == 0, "the slot to be freed")
    assert metric(base_url, "gptlab_sequences_finished_total", finish_reason="abort", model="tiny") == aborted + 1
    assert metric(base_url, "gptlab_requests_total", path="/v1/completions", status="500") == failed  # no error


def test_health_metrics_and_the_chat_page(base_url):
    assert call(base_url, "GET", "/health") == (200, {"status": "ok"})
    text = call(base_url, "GET", "/metrics")[1]
    for family in ("gptlab_requests_total", "gptlab_time_to_first_token_seconds", "gptlab_prompt_tokens_total"):
        assert f"# TYPE {family} " in text
    assert metric(base_url, "gptlab_time_to_first_token_seconds_count", model="tiny") > 0
    assert metric(base_url, "gptlab_generation_tokens_total", model="tiny") > 0
    status, page = call(base_url, "GET", "/")
    assert status == 200 and "<html" in page.lower()


# --------------------------------------------------------------------------- the command


def test_serve_command_says_where_it_listens_and_serves(tiny_model):
    command = [sys.executable, "-m", "gptlab", "serve", "--model", f"tiny={tiny_model}", "--port", "0"]
    server = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        first = server.stderr.readline()
        assert first.startswith("gptlab serve: listening on http://127.0.0.1:") and "no API key required" in first
        url = first.split("listening on ")[1].split()[0]
        # Greedy and ignoring EOS: a sampled first token could be EOS and end the reply after one.
        body = completion_body(model="tiny", max_tokens=2, temperature=0, ignore_eos=True)
        status, answer = call(url, "POST", "/v1/completions", body)
        assert status == 200 and answer["usage"]["completion_tokens"] == 2
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0


def test_serve_command_refuses_bad_options_in_one_line(tiny_model, tmp_path, capfd, monkeypatch):
    missing = tmp_path / "nothing"
    assert_user_error(gptlab_in_process(capfd, "serve", "--model", missing), str(missing), "not a folder")
    assert_user_error(gptlab_in_process(capfd, "serve", "--model", tmp_path), str(tmp_path))
    twice = ("--model", f"a={tiny_model}", "--model", f"a={tiny_model}")
    assert_user_error(gptlab_in_process(capfd, "serve", *twice), "'a' is given twice")
    assert_user_error(gptlab_in_process(capfd, "serve", "--model", tiny_model, "--max-batch", "0"), "--max-batch")
    assert_user_error(gptlab_in_process(capfd, "serve", "--model", tiny_model, "--device", "gpu"), "--device")
    with running_server({"tiny": tiny_model}) as url:
        taken = urlsplit(url).port
        result = gptlab_in_process(capfd, "serve", "--model", tiny_model, "--port", taken)
        assert_user_error(result, f"127.0.0.1:{taken}", "--port")
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    monkeypatch.delitem(sys.modules, "gptlab.serve.server", raising=False)
    assert_user_error(gptlab_in_process(capfd, "serve", "--model", tiny_model), "pip install 'gptlab[serve]'")


# --------------------------------------------------------------------------- the eval harness's OpenAI backend


def write_eval_data(root: Path) -> Path:
    """A TinyWorld-like bench (world_mmlu, arith_add_2, words_reverse) and a text file, in the tiny model's words."""
    rng = random.Random(1)
    bench = root / "world" / "bench"

    def question() -> list[str]:
        return [words(rng, 6) + "?"] + [words(rng, rng.randint(1, 3)) for _ in range(4)] + [rng.choice("ABCD")]

    for subject in ("logic", "myths"):
        for split, n in (("dev", 2), ("test", 4)):
            path = bench / "world_mmlu" / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(question() for _ in range(n))
    sums = [(a, b) for a in range(10, 20) for b in range(40, 42)]
    arith = [
        {
            "question": f"{a}+{b}=?",
            "rationale": f"The answer is {a + b}.",
            "answer": f"The answer is {a + b}.\n#### {a + b}",
        }
        for a, b in sums
    ]
    write_jsonl(bench / "arith" / "add_2_test.jsonl", arith[:4])
    write_jsonl(bench / "arith" / "add_2_fewshot.jsonl", arith[4:8])
    write_jsonl(bench / "words" / "reverse_test.jsonl", [{"input": w, "output": w[::-1]} for w in WORDS[:4]])
    write_jsonl(bench / "words" / "reverse_fewshot.jsonl", [{"input": w, "output": w[::-1]} for w in WORDS[4:8]])
    (root / "text.txt").write_text("\n\n".join(words(rng, rng.randint(5, 60)) for _ in range(3)))
    return root


def eval_results(*args) -> dict:
    code = gptlab_main(["eval", *map(str, args)])
    assert code == 0
    return json.loads(Path(args[args.index("--out") + 1]).read_text())


def test_eval_through_the_server_equals_the_in_process_backend(base_url, tiny_model, tmp_path):
    data = write_eval_data(tmp_path / "data")
    runs = [
        ("world_mmlu,arith_add_2,words_reverse", data / "world", "0,1"),
        ("ppl", data / "text.txt", "0"),
    ]
    for tasks, folder, shots in runs:
        common = ("--tasks", tasks, "--data", folder, "--shots", shots)
        local = eval_results("--model", tiny_model, *common, "--out", tmp_path / "local.json")
        served = eval_results(
            "--backend",
            "openai",
            "--base-url",
            base_url + "/v1",
            "--model",
            "tiny",
            *common,
            "--out",
            tmp_path / "s.json",
        )
        assert set(served["results"]) == set(local["results"]) == set(tasks.split(","))
        assert_close(served["results"], local["results"], tasks)


def assert_close(ours, theirs, where: str) -> None:
    """Equal structures, floats within 1e-4 (the server's prefill and the scorer's packed rows round apart)."""
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs), where
        for key in theirs:
            assert_close(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(theirs, float):
        assert math.isclose(ours, theirs, rel_tol=1e-4, abs_tol=1e-5), (where, ours, theirs)
    else:
        assert ours == theirs, where


def test_openai_backend_is_greedy_where_token_texts_coincide(base_url, tiny_model):
    """Byte tokens of a split character all read as U+FFFD: a continuation whose first byte is not the
    most likely one must not pass as greedy because the two tokens' texts are the same."""
    local = GptlabBackend.from_pretrained(tiny_model)
    remote = OpenAIBackend(base_url + "/v1", "tiny")
    rng = random.Random(0)
    contexts = ["beta alpha"] + [words(rng, rng.randint(1, 6)) for _ in range(20)]
    pairs = [(context, char) for context in contexts for char in "éü東🙂"]
    ours, theirs = remote.loglikelihood(pairs), local.loglikelihood(pairs)
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-4)


def test_eval_through_the_server_names_the_servers_refusal(base_url, tmp_path, capsys):
    """A text longer than the model's window: the in-process backend scores it in windows, the server
    refuses it, and eval ends with one line giving the server's reason (not 'is the server running?')."""
    text = tmp_path / "long.txt"
    text.write_text(" ".join(WORDS * 40))
    code = gptlab_main(
        ["eval", "--backend", "openai", "--base-url", base_url, "--model", "tiny", "--tasks", "ppl"]
        + ["--data", str(text)]
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "answered 400" in lines[0] and "over this server's limit" in lines[0] and "running" not in lines[0]


def test_eval_generation_through_the_server_leaves_special_tokens_out(base_url, tiny_model, tok):
    """After "iota eta" the tiny model's greedy first token is <|assistant|>: the in-process backend
    decodes without special tokens, and so must the server's text."""
    context = "iota eta"
    (tokens,) = Engine.from_pretrained(tiny_model).generate([tok.encode(context)], 1, temperature=0)
    assert tok.decode(tokens) == "<|assistant|>"
    request = GenerationRequest(context, ("\n",), 30)
    local = GptlabBackend.from_pretrained(tiny_model).generate_until([request])
    assert OpenAIBackend(base_url + "/v1", "tiny").generate_until([request]) == local
