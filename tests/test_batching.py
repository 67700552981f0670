"""Continuous batching: a request's output does not depend on what runs beside it or when it
joins; rows leave, free their slot and are reused; stops, log-probs, text and request checks."""

import math

import pytest
import torch

from gptlab.engine import Engine, Sampling
from gptlab.engine.batching import Output, Request, Scheduler
from gptlab.errors import UserError
from helpers import assert_one_line
from test_engine import PROMPTS, ByteTokenizer, assert_clear_greedy, full_logits, tiny

FAMILIES = ["gpt2", "llama"]  # llama: GQA (2 K/V heads for 4 query heads)
PROBES = [[9, 4, 33, 70, 12, 5, 61, 2, 8, 19, 40], [3], [44, 45]]  # several prompt lengths


def drain(scheduler: Scheduler, outputs: dict[int, list[Output]] | None = None) -> dict[int, list[Output]]:
    """Step until no work is left; every sequence's outputs in order."""
    outputs = {} if outputs is None else outputs
    while scheduler.has_work():
        for output in scheduler.step():
            outputs.setdefault(output.seq_id, []).append(output)
    assert scheduler.running == scheduler.waiting == 0
    return outputs


def tokens(outputs: list[Output]) -> list[int]:
    return [t for output in outputs for t in output.token_ids]


def alone(engine: Engine, request: Request) -> list[int]:
    scheduler = Scheduler(engine, max_batch=4)
    seq = scheduler.add(request)
    return tokens(drain(scheduler)[seq])


def joined(engine: Engine, request: Request, after_steps: int, busy: list[Request]) -> list[int]:
    """The request's tokens when it joins, after ``after_steps`` steps, a batch running ``busy``."""
    scheduler = Scheduler(engine, max_batch=len(busy) + 1)
    for other in busy:
        scheduler.add(other)
    outputs: dict[int, list[Output]] = {}
    for _ in range(after_steps):
        for output in scheduler.step():
            outputs.setdefault(output.seq_id, []).append(output)
    seq = scheduler.add(request)
    return tokens(drain(scheduler, outputs)[seq])


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_the_same_alone_joining_a_busy_batch_and_in_generate(family):
    engine = Engine(tiny(family))
    busy = [Request(p, 20 + 3 * i) for i, p in enumerate(PROMPTS)]
    for prompt in PROBES:
        request = Request(prompt, 12)
        expected = engine.generate([prompt], 12, temperature=0)[0]
        assert_clear_greedy(engine.model, [prompt], [expected])
        assert alone(engine, request) == expected
        for after_steps in (0, 1, 5, 17):  # empty cache, and rows of every other length beside it
            assert joined(engine, request, after_steps, busy) == expected, (prompt, after_steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_seeded_sampled_request_draws_the_same_alone_and_in_a_busy_batch(family):
    engine = Engine(tiny(family))
    sampling = Sampling(temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.4, seed=7)
    request = Request(PROBES[0], 16, sampling=sampling)
    busy = [Request(p, 25, sampling=Sampling(temperature=1.0, repetition_penalty=1.2)) for p in PROMPTS]
    expected = alone(engine, request)
    kwargs = dict(temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.4, seed=7)
    assert expected == engine.generate([PROBES[0]], 16, **kwargs)[0]  # the fixed batch draws the same
    assert joined(engine, request, 3, busy) == expected
    other_seed = Request(PROBES[0], 16, sampling=Sampling(temperature=1.3, top_k=20, top_p=0.9, seed=8))
    assert alone(engine, other_seed) != expected


def test_a_request_added_while_others_decode_starts_before_they_finish():
    scheduler = Scheduler(Engine(tiny("llama")), max_batch=4)
    early = [scheduler.add(Request(p, 30)) for p in PROMPTS]
    for _ in range(3):
        scheduler.step()
    late = scheduler.add(Request(PROBES[1], 5))
    assert scheduler.waiting == 1
    outputs = {o.seq_id: o for o in scheduler.step()}
    assert outputs[late].token_ids and all(outputs[s].finish_reason is None for s in early)
    assert scheduler.running == 4 and scheduler.waiting == 0
    finished = drain(scheduler)
    assert finished[late][-1].finish_reason == "length" and len(tokens(finished[late])) == 4


def test_cancel_frees_the_slot_within_one_step_and_the_slot_is_reused():
    engine = Engine(tiny("gpt2"))
    scheduler = Scheduler(engine, max_batch=2)
    first, second = (scheduler.add(Request(p, 30)) for p in PROMPTS[:2])
    queued = scheduler.add(Request(PROBES[0], 6))
    doomed_in_queue = scheduler.add(Request(PROBES[1], 6))
    scheduler.step()
    assert (scheduler.running, scheduler.waiting) == (2, 2)
    scheduler.cancel(first)
    scheduler.cancel(doomed_in_queue)
    scheduler.cancel(12345)  # unknown: nothing happens
    outputs = {o.seq_id: o for o in scheduler.step()}
    assert outputs[first].finish_reason == outputs[doomed_in_queue].finish_reason == "abort"
    assert outputs[first].token_ids == [] and outputs[queued].token_ids  # the freed slot serves the queue at once
    assert (scheduler.running, scheduler.waiting) == (2, 0)
    scheduler.cancel(first)  # already finished: nothing happens
    finished = drain(scheduler)
    assert first not in finished and doomed_in_queue not in finished
    assert tokens([outputs[queued], *finished[queued]]) == alone(engine, Request(PROBES[0], 6))


def test_a_non_finite_value_a_sequence_leaves_in_its_row_never_reaches_the_next():
    engine = Engine(tiny("llama"))
    scheduler = Scheduler(engine, max_batch=2)
    poisoned = scheduler.add(Request(PROMPTS[0], 20))
    scheduler.add(Request(PROMPTS[0], 45))  # a longer neighbour: the next one's span covers masked slots
    for _ in range(10):
        scheduler.step()
    written = scheduler.rows[0].length
    scheduler.cache.kv[:, :, 0, :, :written].fill_(float("nan"))  # as if the model had overflowed for this sequence
    outputs: dict[int, list[Output]] = {}
    while poisoned not in outputs or outputs[poisoned][-1].finish_reason is None:
        for output in scheduler.step():
            outputs.setdefault(output.seq_id, []).append(output)
    request = Request(PROBES[1], 12, logprobs=0)
    seq = scheduler.add(request)
    outputs = drain(scheduler)[seq]
    assert tokens(outputs) == alone(engine, request)
    assert all(math.isfinite(lp.logprob) for o in outputs for lp in o.logprobs)


def test_stop_ids_stop_strings_and_max_new_tokens_give_their_finish_reasons():
    tok = ByteTokenizer()
    engine = Engine(tiny("llama", vocab_size=258), tok)
    prompt = tok.encode("hello")
    free = alone(engine, Request(prompt, 30))
    assert len(free) == 30
    scheduler = Scheduler(engine)
    stop_id = scheduler.add(Request(prompt, 30, stop_ids=(free[4],)))
    text = tok.decode(free)
    stop_string = text[len(tok.decode(free[:6])) :][:2]  # a stop string that the text reaches after 6 tokens
    by_text = scheduler.add(Request(prompt, 30, stop=(stop_string,)))
    length = scheduler.add(Request(prompt, 3))
    outputs = drain(scheduler)
    first_stop = free.index(free[4])
    assert tokens(outputs[stop_id]) == free[: first_stop + 1] and outputs[stop_id][-1].finish_reason == "stop"
    assert "".join(o.text for o in outputs[stop_id]) == tok.decode(free[:first_stop])  # the stop id adds no text
    assert outputs[by_text][-1].finish_reason == "stop"
    assert "".join(o.text for o in outputs[by_text]) == text[: text.find(stop_string)]
    assert tokens(outputs[length]) == free[:3] and outputs[length][-1].finish_reason == "length"
    assert all(o.finish_reason is None for outs in outputs.values() for o in outs[:-1])


def test_max_new_tokens_0_finishes_at_once_with_the_prompt_logprobs():
    model = tiny("gpt2")
    scheduler = Scheduler(Engine(model), max_batch=1)
    busy = scheduler.add(Request(PROMPTS[0], 10))
    scheduler.step()
    scored = scheduler.add(Request(PROBES[0], 0, logprobs=2, prompt_logprobs=True))
    bare = scheduler.add(Request(PROBES[1], 0))
    outputs = {o.seq_id: o for o in scheduler.step()}  # needs no slot: done although the only one is taken
    assert outputs[bare].finish_reason == outputs[scored].finish_reason == "length"
    assert outputs[bare].token_ids == [] and outputs[bare].prompt_logprobs is None
    assert outputs[scored].logprobs == [] and len(outputs[scored].prompt_logprobs) == len(PROBES[0])
    assert outputs[busy].finish_reason is None and scheduler.waiting == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_and_prompt_logprobs_are_the_models_own(family):
    model = tiny(family)
    scheduler = Scheduler(Engine(model), max_batch=3)
    scheduler.add(Request(PROMPTS[1], 20))  # company of another length
    scheduler.step()
    k = 5
    requests = {
        scheduler.add(request): request
        for request in [
            Request(PROMPTS[0], 8, Sampling(temperature=1.0, seed=1), logprobs=k, prompt_logprobs=True),
            Request(PROBES[0], 8, logprobs=0),
        ]
    }
    outputs = drain(scheduler)
    for seq, request in requests.items():
        new = tokens(outputs[seq])
        ids = request.prompt + new
        expected = full_logits(model, ids).log_softmax(-1)  # row t: the distribution of token t + 1
        entries = [lp for o in outputs[seq] for lp in o.logprobs]
        assert [e.token for e in entries] == new
        if request.prompt_logprobs:
            prompt_entries = outputs[seq][0].prompt_logprobs
            assert prompt_entries[0] is None and [e.token for e in prompt_entries[1:]] == request.prompt[1:]
            assert all(o.prompt_logprobs is None for o in outputs[seq][1:])  # on the first output only
            entries = prompt_entries[1:] + entries
        for t, entry in enumerate(entries):
            row = expected[t + len(ids) - len(entries) - 1]
            assert entry.logprob == pytest.approx(float(row[entry.token]), abs=1e-5)
            assert len(entry.top) == request.logprobs
            top_values = [v for _, v in entry.top]
            assert top_values == sorted(top_values, reverse=True)
            for token, value in entry.top:
                assert value == pytest.approx(float(row[token]), abs=1e-5)
            if entry.top:
                assert entry.top[0][0] == int(row.argmax())


def test_the_texts_of_the_outputs_join_to_the_decoded_text():
    tok = ByteTokenizer()  # random bytes: multi-byte characters, cut ones, genuine U+FFFD
    engine = Engine(tiny("gpt2", vocab_size=258), tok)
    scheduler = Scheduler(engine, max_batch=3)
    sequences = [
        scheduler.add(Request(tok.encode(p), 40, Sampling(temperature=1.0, seed=i)))
        for i, p in enumerate(["héllo", "ñ🙂", "a"])
    ]
    outputs = drain(scheduler)
    for seq in sequences:
        new = tokens(outputs[seq])
        assert "".join(o.text for o in outputs[seq]) == tok.decode(new)
    text_engine = Engine(tiny("gpt2", vocab_size=258), tok)
    expected = "".join(text_engine.stream_text("héllo", max_new_tokens=40, temperature=1.0, seed=0, stop_ids=[]))
    assert "".join(o.text for o in outputs[sequences[0]]) == expected


def test_multi_byte_characters_come_out_whole(monkeypatch):
    text = "café 🙂 ok ñ"
    script = iter(text.encode())  # one byte per token: most characters span several steps
    monkeypatch.setattr(Scheduler, "_choose", lambda self, seqs, logits: torch.tensor([next(script) for _ in seqs]))
    tok = ByteTokenizer()
    scheduler = Scheduler(Engine(tiny("llama", vocab_size=258), tok), max_batch=1)
    seq = scheduler.add(Request(tok.encode("hi"), len(text.encode())))
    pieces = [o.text for o in drain(scheduler)[seq]]
    assert "".join(pieces) == text and all("\ufffd" not in piece for piece in pieces)
    assert sum(map(bool, pieces)) == len(text)  # each character as soon as it is complete


def test_text_and_stops_with_a_bpe_tokenizer_equal_the_engines_text_stream(tiny_model):
    engine = Engine.from_pretrained(tiny_model)
    tok = engine.tokenizer
    settings = dict(temperature=1.0, seed=5)
    full = engine.generate_text("red", max_new_tokens=30, **settings)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    scheduler = Scheduler(engine)
    plain, stopped = (
        scheduler.add(Request(tok.encode("red"), 30, Sampling(**settings), stop_ids=(tok.eos_id,), stop=stops))
        for stops in ((), (stop,))
    )
    outputs = drain(scheduler)
    assert "".join(o.text for o in outputs[plain]) == full
    expected = engine.generate_text("red", max_new_tokens=30, stop=stop, **settings)
    assert "".join(o.text for o in outputs[stopped]) == expected == full[: full.find(stop)]
    assert outputs[stopped][-1].finish_reason == "stop"


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(prompt=[]), "empty"),
        (dict(prompt=[5, 97]), "vocabulary"),
        (dict(max_new_tokens=60), "block_size 64"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(sampling=Sampling(temperature=-1.0)), "temperature"),
        (dict(sampling=Sampling(top_p=0.0)), "top_p"),
        (dict(logprobs=-1), "logprobs"),
        (dict(stop=("x",)), "tokenizer"),
        (dict(stop="x"), "tuple of strings"),
    ],
)
def test_bad_requests_raise_one_line_user_errors(change, fragment):
    scheduler = Scheduler(Engine(tiny("llama")))
    request = dict(prompt=PROMPTS[0], max_new_tokens=4) | change
    with pytest.raises(UserError, match=fragment) as error:
        scheduler.add(Request(**request))
    assert_one_line(error)
    assert scheduler.waiting == 0 and not scheduler.has_work()


def test_a_free_row_inside_the_batch_changes_nothing_and_is_taken_first():
    """A row that finished below running ones leaves a hole the decode steps still cover."""
    engine = Engine(tiny("llama"))
    scheduler = Scheduler(engine, max_batch=3)
    requests = [Request(PROMPTS[0], 20), Request(PROMPTS[1], 2), Request(PROBES[0], 24)]
    sequences = [scheduler.add(request) for request in requests]
    outputs: dict[int, list[Output]] = {}
    for _ in range(4):
        for output in scheduler.step():
            outputs.setdefault(output.seq_id, []).append(output)
    assert outputs[sequences[1]][-1].finish_reason == "length"
    assert [seq is None for seq in scheduler.rows] == [False, True, False]
    late = Request(PROBES[1], 6)
    sequences.append(scheduler.add(late))
    for output in scheduler.step():
        outputs.setdefault(output.seq_id, []).append(output)
    assert scheduler.rows[1].seq_id == sequences[3]
    drain(scheduler, outputs)
    for seq, request in zip(sequences, [*requests, late]):
        assert tokens(outputs[seq]) == alone(engine, request)
    assert torch.count_nonzero(scheduler.cache.kv[..., 1:, :]) == 0  # every leaving row was cleared
