"""The engine: KV-cache decoding equals the full forward, matches transformers' greedy search,
samples only from the allowed set, stops and streams correctly."""

import random

import pytest
import torch

from gptlab.engine import Engine, PackedLinears, StaticDecodeStep, sample_next
from gptlab.errors import UserError
from gptlab.model import GPT, ModelConfig
from gptlab.tokenizer import Tokenizer
from helpers import WORDS

pytestmark = pytest.mark.usefixtures("on_one_thread")  # conftest: tiny models run fastest on one thread

VOCAB = 97
PROMPTS = [[5, 17, 3, 90, 41, 8, 22], [11, 2], [60, 61, 62, 7]]  # different lengths: left padding


def tiny(family: str, **overrides) -> GPT:
    torch.manual_seed(0)
    settings = dict(family=family, vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32)
    if family == "llama":
        settings["n_kv_head"] = 2  # GQA: n_kv_head < n_head
    return GPT(ModelConfig(**{**settings, **overrides})).eval()


def full_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) from one plain forward: no cache, no padding."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def step_logits(model: GPT, prompt: list[int], new: list[int]) -> torch.Tensor:
    """The logits each new token was drawn from, recomputed without the engine."""
    return full_logits(model, prompt + new)[len(prompt) - 1 : len(prompt) - 1 + len(new)]


NEAR_TIE = 1e-4  # logits closer than this may order either way between two computations equal in theory


def assert_clear_greedy(model: GPT, prompts: list[list[int]], tokens: list[list[int]]) -> None:
    """``tokens`` are the argmax of a plain forward at every step, and no step is a near-tie: two decoding
    paths that agree on them agree by more than luck (on an untrained model top logits can be 1e-6 apart)."""
    for prompt, new in zip(prompts, tokens):
        logits = step_logits(model, prompt, new)
        top2 = logits.topk(2, dim=-1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > NEAR_TIE, "near-tie: equality would be luck; change the seed"
        assert logits.argmax(-1).tolist() == new


@pytest.fixture(params=["plain", "packed"])
def packing(request, monkeypatch):
    """Run a test on the default linear layers and again with every weight prepacked for oneDNN."""
    if request.param == "packed":
        if not PackedLinears(tiny("llama"))._usable():
            pytest.skip("this PyTorch build has no oneDNN linear")
        monkeypatch.setattr(PackedLinears, "MIN_WEIGHTS", 0)  # the test models' weights are all small
    else:
        monkeypatch.setattr(PackedLinears, "MIN_WEIGHTS", float("inf"))
    return request.param


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decode_equals_full_forward(family, packing):
    model = tiny(family)
    engine = Engine(model)
    tokens, logprobs = engine.generate(PROMPTS, 12, temperature=0, return_logprobs=True)
    for prompt, new, lps in zip(PROMPTS, tokens, logprobs):
        assert len(new) == len(lps) == 12
        logits = step_logits(model, prompt, new)
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-5, rtol=0)
        assert_clear_greedy(model, [prompt], [new])
        assert engine.generate([prompt], 12, temperature=0) == [new]  # padding changes nothing
    assert len(engine.packed.packs) == (0 if packing == "plain" else len(engine.packed.linears))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_static_decode_equals_growing_cache(family, monkeypatch):
    """The fixed-shape decode step that CUDA graphs replay computes what the growing cache does."""
    model = tiny(family)
    expected = Engine(model).generate(PROMPTS, 12, temperature=0, return_logprobs=True)
    assert_clear_greedy(model, PROMPTS, expected[0])
    monkeypatch.setattr(Engine, "STATIC_DECODE_DEVICES", ("cpu", "cuda"))
    static = Engine(model, cuda_graphs=True)
    tokens, logprobs = static.generate(PROMPTS, 12, temperature=0, return_logprobs=True)
    assert tokens == expected[0]
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected[1]), atol=1e-5, rtol=0)
    assert static.generate([PROMPTS[1]], 12, temperature=0) == [tokens[1]]  # no padding mask
    # One-token prompts: the prefill is a one-token step too, and must not attend to empty slots.
    single = [[5], [60]]
    expected = Engine(model).generate(single, 12, temperature=0, return_logprobs=True)
    assert_clear_greedy(model, single, expected[0])
    got = static.generate(single, 12, temperature=0, return_logprobs=True)
    assert got[0] == expected[0]
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(expected[1]), atol=1e-5, rtol=0)


def test_replayed_static_steps_serve_later_generations(monkeypatch):
    """A captured step is replayed by later generations of the same batch size and rounded length,
    and captured again when the shape or the weights change. On the CPU a stand-in replays it as
    a CUDA graph would: the step's code as it ran at capture (same slot), on the same buffers,
    into the same logits tensor, leaving the cache's Python-side count alone."""
    captures = []

    def capture_on_cpu(step, slot):
        buffers = (step.ids, step.positions, step.cache.index, step.real_key, step.cache.kv)
        addresses = [t.data_ptr() for t in buffers]
        captures.append(step)
        step.logits = step._forward(slot)

        def replay():
            assert [t.data_ptr() for t in buffers] == addresses  # a graph reads the memory it captured
            pos = step.cache.pos
            step.logits.copy_(step._forward(slot))
            step.cache.pos = pos

        step.graph = type("Replay", (), {"replay": staticmethod(replay)})()

    monkeypatch.setattr(Engine, "STATIC_DECODE_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(Engine, "STATIC_CACHE_ROUNDING", 16)
    monkeypatch.setattr(StaticDecodeStep, "CAPTURE_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(StaticDecodeStep, "_capture", capture_on_cpu)
    model = tiny("llama")  # block_size 64
    engine = Engine(model, cuda_graphs=True)

    def check(prompts, new_tokens, got=None):
        expected = Engine(model).generate(prompts, new_tokens, temperature=0, return_logprobs=True)
        assert_clear_greedy(model, prompts, expected[0])
        got = got or engine.generate(prompts, new_tokens, temperature=0, return_logprobs=True)
        assert got[0] == expected[0]
        torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(expected[1]), atol=1e-5, rtol=0)

    # Padded, unpadded, padded differently, 19-23 tokens: one cache of 32 slots and one capture serve them all.
    for prompts, new_tokens in (
        (PROMPTS, 12),
        ([[7, 8, 9], [1, 2, 3], [4, 4, 4]], 20),
        ([[3], PROMPTS[0], [9, 9]], 12),
    ):
        check(prompts, new_tokens)
    assert len(captures) == 1 and captures[0].cache.max_len == 32
    check([[5, 6]], 12)  # another batch size
    check([[5, 6]], 60)  # another length: 62 rounds up to 64, the block size
    assert len(captures) == 3 and captures[-1].cache.max_len == 64
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2)  # weights moved
    check([[5, 6]], 60)
    assert len(captures) == 4

    # Two streams decoding at once each keep their own cache.
    first, second = ([[5, 17, 3]], 30), ([[60, 61, 62, 7, 9]], 30)
    streams = [engine.stream(*first, temperature=0, return_logprobs=True)]
    outputs = [([], []), ([], [])]
    for step in range(30):
        if step == 1:
            streams.append(engine.stream(*second, temperature=0, return_logprobs=True))
        for stream, (tokens, logprobs) in zip(streams, outputs):
            (token,), (logprob,) = next(stream)
            tokens.append(token)
            logprobs.append(logprob)
    (token,), (logprob,) = next(streams[1])
    outputs[1][0].append(token)
    outputs[1][1].append(logprob)
    check(*first, got=([outputs[0][0]], [outputs[0][1]]))
    check(*second, got=([outputs[1][0]], [outputs[1][1]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_graph_decode_equals_eager(family):
    model = tiny(family).cuda()
    engine = Engine(model, cuda_graphs=True)
    for prompts in (PROMPTS, [[7, 8, 9], [1, 2, 3], [4, 4, 4]], [[5], [60]]):  # the second replays the first's graph
        eager = Engine(model).generate(prompts, 12, temperature=0, return_logprobs=True)
        graphed = engine.generate(prompts, 12, temperature=0, return_logprobs=True)
        assert graphed[0] == eager[0]
        torch.testing.assert_close(torch.tensor(graphed[1]), torch.tensor(eager[1]), atol=1e-4, rtol=0)
        assert graphed[0] == Engine(tiny(family)).generate(prompts, 12, temperature=0)


def test_packed_weights_follow_the_model(monkeypatch):
    """Packed copies never go stale: an optimizer step repacks them on the next generation, a weight
    changed inside the block falls back to the plain layer, and gradients still flow."""
    if not PackedLinears(tiny("llama"))._usable():
        pytest.skip("this PyTorch build has no oneDNN linear")
    monkeypatch.setattr(PackedLinears, "MIN_WEIGHTS", 0)
    model = tiny("llama")
    engine = Engine(model)
    before = engine.generate(PROMPTS, 6, temperature=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    model(torch.tensor([PROMPTS[0]]), torch.tensor([PROMPTS[0]])).backward()
    optimizer.step()
    model.eval()
    after = engine.generate(PROMPTS, 6, temperature=0)
    assert after != before
    assert_clear_greedy(model, PROMPTS, after)

    ids = torch.tensor([PROMPTS[0]])
    with engine.packed():
        with torch.no_grad():
            model.lm_head.weight.mul_(2)  # in place: the version counter moves
            expected = torch.nn.functional.linear(model.hidden(ids), model.lm_head.weight)
            torch.testing.assert_close(model(ids), expected, atol=0, rtol=0)
            model.lm_head.weight.data = model.lm_head.weight.data * 3  # new storage, same version counter
            expected = torch.nn.functional.linear(model.hidden(ids), model.lm_head.weight)
            torch.testing.assert_close(model(ids), expected, atol=0, rtol=0)
        model.zero_grad()
        model(ids, ids).backward()
        packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(ids, ids).backward()
    for packed_grad, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(packed_grad, p.grad, atol=0, rtol=0)
    assert all("forward" not in m.__dict__ for m in engine.packed.linears)  # the layers are plain again


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_is_causal(family):
    model = tiny(family)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[0, :9], b[0, :9], atol=0, rtol=0)
    assert not torch.allclose(a[0, 9:], b[0, 9:])


def hf_model(family: str, path):
    """A random transformers model saved to ``path``; weights large enough to avoid argmax near-ties."""
    import transformers  # the test extra's: imported plainly, so a broken install fails instead of skipping

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            initializer_range=0.2,
            **common,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, layer_norm_epsilon=1e-5, initializer_range=0.2, **common
        )
        model = transformers.GPT2LMHeadModel(config)
    model.eval().save_pretrained(path)
    return model


def hf_greedy(hf, prompts: list[list[int]], n: int, **options) -> tuple[list[list[int]], float]:
    """transformers' greedy search with left padding; also the smallest top-1/top-2 logit gap seen."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
            **options,
        )
    top2 = torch.stack(out.scores).topk(2, dim=-1).values
    return out.sequences[:, longest:].tolist(), float((top2[..., 0] - top2[..., 1]).min())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_matches_transformers(family, tmp_path):
    hf = hf_model(family, tmp_path)
    engine = Engine(GPT.from_pretrained(tmp_path))
    for prompts in ([PROMPTS[0]], PROMPTS):
        expected, gap = hf_greedy(hf, prompts, 16)
        assert gap > 1e-4, "near-tie in the reference: equality would be luck; change the seed"
        assert engine.generate(prompts, 16, temperature=0) == expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_repetition_penalty_matches_transformers(family, tmp_path):
    hf = hf_model(family, tmp_path)
    engine = Engine(GPT.from_pretrained(tmp_path))
    for prompts in ([PROMPTS[0]], PROMPTS):  # padded too: neither side penalises the pad slots
        plain = engine.generate(prompts, 24, temperature=0)
        for penalty in (1.8, 0.7):
            expected, gap = hf_greedy(hf, prompts, 24, repetition_penalty=penalty)
            assert gap > 1e-4, "near-tie in the reference: equality would be luck; change the seed"
            got = engine.generate(prompts, 24, temperature=0, repetition_penalty=penalty)
            assert got == expected and got != plain


@pytest.mark.parametrize("static", [False, True])
def test_n_samples_share_one_prefill(static, monkeypatch):
    """n samples per prompt: one prefill of the prompts, then rows that sample on their own and are
    exactly what the prompts repeated n times would give."""
    if static:
        monkeypatch.setattr(Engine, "STATIC_DECODE_DEVICES", ("cpu", "cuda"))
    model = tiny("llama")
    engine = Engine(model, cuda_graphs=static)
    prefills = []
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda ids, *a: prefills.append(tuple(ids.shape)) or hidden(ids, *a))
    tokens, logprobs = engine.generate(PROMPTS, 10, temperature=1.0, seed=5, n=4, return_logprobs=True)
    assert prefills[0] == (3, 7) and all(shape == (12, 1) for shape in prefills[1:])
    repeated = [p for p in PROMPTS for _ in range(4)]
    expected = Engine(model).generate(repeated, 10, temperature=1.0, seed=5, return_logprobs=True)
    assert tokens == expected[0]
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected[1]), atol=1e-5, rtol=0)
    assert all(len({tuple(t) for t in tokens[i : i + 4]}) > 1 for i in range(0, 12, 4))  # samples differ
    greedy = engine.generate(PROMPTS, 10, temperature=0, n=2)
    assert greedy[::2] == greedy[1::2] == Engine(model).generate(PROMPTS, 10, temperature=0)


def test_seeded_sampling_is_reproducible():
    engine = Engine(tiny("llama"))  # untrained: a flat distribution, so different seeds differ
    a = engine.generate(PROMPTS, 20, temperature=1.0, seed=123)
    assert a == engine.generate(PROMPTS, 20, temperature=1.0, seed=123)
    assert a != engine.generate(PROMPTS, 20, temperature=1.0, seed=124)


def test_temperature_zero_is_greedy_and_ignores_seed():
    engine = Engine(tiny("gpt2"))
    greedy = engine.generate(PROMPTS, 10, temperature=0)
    assert engine.generate(PROMPTS, 10, temperature=0, seed=1, top_k=3) == greedy
    assert engine.generate(PROMPTS, 10, temperature=0, seed=2, top_p=0.5) == greedy


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_top_k_emits_only_top_k_tokens(family):
    model = tiny(family)  # flat: unfiltered sampling would leave the top 3 of 97 almost every step
    tokens, logprobs = Engine(model).generate(PROMPTS, 30, temperature=1.5, top_k=3, seed=0, return_logprobs=True)
    for prompt, new, lps in zip(PROMPTS, tokens, logprobs):
        logits = step_logits(model, prompt, new)
        chosen = logits.gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
        assert (chosen >= logits.topk(3, dim=-1).values[:, -1] - 1e-5).all()
        # log-probs are of the raw logits: neither temperature nor filtering changes them
        torch.testing.assert_close(torch.tensor(lps), chosen - logits.logsumexp(-1), atol=1e-5, rtol=0)


def nucleus_violations(model: GPT, tokens: list[list[int]], top_p: float) -> int:
    """How many emitted tokens lie outside the nucleus (the smallest top set reaching top_p) of their step."""
    count = 0
    for prompt, new in zip(PROMPTS, tokens):
        probs = step_logits(model, prompt, new).softmax(-1)
        chosen = probs.gather(-1, torch.tensor(new)[:, None])
        mass_before = (probs * (probs > chosen)).sum(-1)  # mass of the tokens ranked above it
        count += int((mass_before >= top_p + 1e-4).sum())
    return count


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_top_p_emits_only_nucleus_tokens(family):
    model = tiny(family)
    engine = Engine(model)
    assert nucleus_violations(model, engine.generate(PROMPTS, 30, top_p=0.6, seed=0), 0.6) == 0
    assert nucleus_violations(model, engine.generate(PROMPTS, 30, seed=0), 0.6) > 0  # the check has teeth


def test_sample_next_filters_exactly():
    logits = torch.tensor([0.5, 0.3, 0.2, 0.0]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, 1.0, top_p=0.79, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.81, generator=g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # top-p acts on the top-k renormalised: [4/7, 3/7] keeps only token 0 at 0.55 (0.4 alone would not reach it).
    two = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(4000, 4)
    assert set(sample_next(two, 1.0, top_k=2, top_p=0.55, generator=g).tolist()) == {0}
    assert set(sample_next(two, 1.0, top_p=0.55, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2}  # zero probability: never


def test_stop_ids_end_a_row_and_others_continue():
    engine = Engine(tiny("llama"))
    free = engine.generate(PROMPTS, 12, temperature=0)
    stop = next(t for t in free[0][:8] if t not in free[1])  # ends row 0 early, never row 1
    end = free[0].index(stop) + 1
    tokens = engine.generate(PROMPTS, 12, temperature=0, stop_ids=[stop])
    for row, expected in zip(tokens, free):
        assert row == (expected[: expected.index(stop) + 1] if stop in expected else expected)
    assert len(tokens[0]) == end < 12  # the stop token is emitted, then the row ends
    assert tokens[1] == free[1]
    steps = list(engine.stream(PROMPTS, 12, temperature=0, stop_ids=[stop]))
    assert len(steps) == 12 and all(step[0] is None for step in steps[end:])
    assert all(step[1] is not None for step in steps)


def test_stream_ends_when_every_row_has_stopped():
    engine = Engine(tiny("gpt2"))
    free = engine.generate(PROMPTS, 8, temperature=0)
    stops = [row[1] for row in free]
    steps = list(engine.stream(PROMPTS, 8, temperature=0, stop_ids=stops))
    assert len(steps) < 8


def test_too_long_raises_user_error():
    engine = Engine(tiny("llama"))
    with pytest.raises(UserError, match="block_size 64") as info:
        engine.generate([[1] * 40], 30)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        engine.stream([[1] * 40], 30)  # checked when called, before the first step is asked for
    assert len(engine.generate([[1] * 40], 24, temperature=0)[0]) == 24  # exactly block_size fits
    for prompts in (torch.tensor([[1, 2, 3]]), [torch.tensor([1, 2, 3])]):  # transformers' habit
        with pytest.raises(UserError, match="tolist"):
            engine.generate(prompts, 4)


def test_generation_ignores_dropout_and_keeps_training_mode():
    model = tiny("gpt2", dropout=0.5)
    expected = Engine(model).generate(PROMPTS, 8, temperature=0)
    model.train()
    assert Engine(model).generate(PROMPTS, 8, temperature=0) == expected
    assert model.training


class ByteTokenizer:
    """One token per UTF-8 byte (0..255); 256 is EOS, 257 is BOS."""

    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return [257, *text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:  # EOS and BOS always drop out
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_stream_text_never_splits_a_character(monkeypatch):
    text = "café 🙂 ok ñ"
    script = [*text.encode(), ByteTokenizer.eos_id, 65]
    engine = Engine(tiny("llama", vocab_size=258), ByteTokenizer())
    monkeypatch.setattr(engine, "stream", lambda prompts, n, **kw: ([t] for t in script[:n]))
    pieces = list(engine.stream_text("hi", max_new_tokens=50))
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text  # ends at EOS, which is not rendered
    assert len(pieces) == len(text)  # a piece per character: nothing held back longer than needed


def test_stream_text_joins_to_the_full_decode():
    tok = ByteTokenizer()
    engine = Engine(tiny("gpt2", vocab_size=258), tok)
    tokens = engine.generate([tok.encode("héllo")], 40, temperature=1.0, seed=3, stop_ids=[tok.eos_id])[0]
    expected = tok.decode(tokens)  # random bytes: may hold genuine U+FFFD, which must still come out
    assert "".join(engine.stream_text("héllo", max_new_tokens=40, temperature=1.0, seed=3)) == expected
    assert engine.generate_text("héllo", max_new_tokens=40, temperature=1.0, seed=3) == expected


def test_stop_strings_end_the_text_and_are_left_out(monkeypatch):
    tok = ByteTokenizer()
    engine = Engine(tiny("llama", vocab_size=258), tok)
    consumed = []

    def scripted(text):
        def stream(prompts, n, **kw):
            for t in text.encode()[:n]:
                consumed.append(t)
                yield [t]

        return stream

    monkeypatch.setattr(engine, "stream", scripted("abc ST STOP def"))
    pieces = list(engine.stream_text("hi", max_new_tokens=50, stop=["STOP", "xyz"]))
    assert "".join(pieces) == "abc ST "
    assert "S" not in pieces[0] and len(consumed) == len("abc ST STOP")  # the model stops at the stop string
    assert engine.generate_text("hi", max_new_tokens=50, stop="STOP") == "abc ST "  # one string, not its letters
    with pytest.raises(UserError, match="generate"):
        engine.generate_text("hi", max_new_tokens=5, n=2)
    consumed.clear()
    monkeypatch.setattr(engine, "stream", scripted("abc STO"))  # a stop string's start that never completes
    assert engine.generate_text("hi", max_new_tokens=50, stop=["STOP"]) == "abc STO"

    monkeypatch.undo()
    text = engine.generate_text("hello", max_new_tokens=30, temperature=1.0, seed=4)
    stop = text[6:8]
    got = engine.generate_text("hello", max_new_tokens=30, temperature=1.0, seed=4, stop=[stop])
    assert got == text[: text.find(stop)]


def bpe_model_folder(path) -> Engine:
    """A random model with a BPE tokenizer trained on WORDS (many tokens are several characters), saved to
    ``path``; weights large enough to avoid argmax near-ties."""
    rng = random.Random(0)
    tok = Tokenizer.train([" ".join(rng.choices(WORDS, k=20)) for _ in range(200)], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(path, tokenizer=tok)
    return Engine(GPT.from_pretrained(path), Tokenizer.from_pretrained(path))


def test_stop_strings_inside_bpe_tokens_stop_where_transformers_stops(tmp_path, monkeypatch):
    """A stop string that ends inside a multi-character token, and one that starts inside one, end generation
    at the token that completes them, as transformers' generate(stop_strings=...) does on the same folder, and
    the text is cut before them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = bpe_model_folder(tmp_path)
    tok = engine.tokenizer
    hf, hf_tok = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    prompt = tok.encode("alpha beta")

    def hf_generate(**options) -> tuple[list[int], float]:
        """transformers' greedy tokens after the prompt, and the smallest top-1/top-2 logit gap seen."""
        out = hf.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=30,
            output_scores=True,
            return_dict_in_generate=True,
            **options,
        )
        top2 = torch.stack(out.scores).topk(2, dim=-1).values
        return out.sequences[0, len(prompt) :].tolist(), float((top2[..., 0] - top2[..., 1]).min())

    tokens = engine.generate([prompt], 30, temperature=0)[0]
    expected, gap = hf_generate()
    assert gap > 1e-4, "near-tie in the reference: equality would be luck; change the seed"
    assert tokens == expected
    text = tok.decode(tokens)
    pieces = [tok.decode([t]) for t in tokens]
    # The first token of 3+ letters after a token ending in a letter: the stops straddle its start and its end.
    k = next(i for i in range(1, len(tokens) - 1) if len(pieces[i]) >= 3 and (pieces[i - 1][-1] + pieces[i]).isalpha())
    start = len(tok.decode(tokens[:k]))  # where token k's text begins
    cases = [  # (stop, where the text ends, tokens the model writes)
        (pieces[k - 1][-1] + pieces[k][:2], start - 1, k + 1),  # ends inside token k
        (pieces[k][1:] + pieces[k + 1], start + 1, k + 2),  # starts inside token k, ends with token k + 1
    ]
    consumed: list[int] = []
    stream = engine.stream

    def recording_stream(*args, **kwargs):
        for step in stream(*args, **kwargs):
            consumed.append(step[0])
            yield step

    monkeypatch.setattr(engine, "stream", recording_stream)
    for stop, end, n_tokens in cases:
        assert text.find(stop) == end  # its first occurrence
        consumed.clear()
        got = engine.generate_text("alpha beta", max_new_tokens=30, temperature=0, stop=[stop])
        assert got == text[:end], stop
        assert consumed == tokens[:n_tokens], stop  # the model stopped at the token completing the stop string
        theirs, _ = hf_generate(stop_strings=[stop], tokenizer=hf_tok)
        assert theirs == consumed, stop
        their_text = hf_tok.decode(theirs, skip_special_tokens=True)
        assert their_text[: their_text.find(stop)] == got, stop


def test_text_needs_a_tokenizer():
    with pytest.raises(UserError, match="tokenizer"):
        Engine(tiny("llama")).generate_text("hello", max_new_tokens=3)
