"""The evaluation harness: parity with lm-evaluation-harness, scores that equal a plain forward
whatever the batch size, prompts as documented, metrics against hand-computed cases, and one
clear line for every bad input."""

import csv
import http.server
import json
import math
import random
import threading
import warnings
from pathlib import Path

import pytest
import torch

from gptlab.cli import main as gptlab_main
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.eval import GenerationRequest, GptlabBackend, HFBackend, OpenAIBackend, evaluate, format_table, metrics
from gptlab.eval.backends import rolling_windows
from gptlab.eval.tasks import load_task
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer
from helpers import TINY_MODEL_BLOCK, WORDS, gptlab_in_process, write_jsonl

pytestmark = pytest.mark.usefixtures("on_one_thread")  # conftest: tiny models run fastest on one thread


def mmlu_row(rng: random.Random) -> list[str]:
    question = " ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + "?"
    return [question] + [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(4)] + [rng.choice("ABCD")]


def write_csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """An MMLU folder (2 subjects, 5 dev + 6 test rows), a TinyWorld-like folder and a text file, all
    written with the words the tiny model's tokenizer was trained on."""
    root = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    for subject in ("pure_logic", "greek"):
        write_csv(root / "mmlu" / "dev" / f"{subject}_dev.csv", [mmlu_row(rng) for _ in range(5)])
        write_csv(root / "mmlu" / "test" / f"{subject}_test.csv", [mmlu_row(rng) for _ in range(6)])
    world = root / "world" / "bench"
    for split in ("dev", "test"):
        for f in (root / "mmlu" / split).iterdir():
            with open(f, newline="") as rows:
                write_csv(world / "world_mmlu" / split / f.name, list(csv.reader(rows)))
    sums = [(a, b) for a in range(10, 30) for b in range(40, 45)]
    arith = [
        {
            "question": f"{a}+{b}=?",
            "rationale": f"Let's think step by step. The answer is {a + b}.",
            "answer": f"Let's think step by step. The answer is {a + b}.\n#### {a + b}",
        }
        for a, b in sums
    ]
    write_jsonl(world / "arith" / "add_2_test.jsonl", arith[:6])
    write_jsonl(world / "arith" / "add_2_fewshot.jsonl", arith[6:10])
    words = [{"input": w, "output": w[::-1]} for w in WORDS]
    write_jsonl(world / "words" / "reverse_test.jsonl", words[:5])
    write_jsonl(world / "words" / "reverse_fewshot.jsonl", words[5:8])
    (root / "text.txt").write_text("\n\n".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 300))) for _ in range(4)))
    return root


@pytest.fixture(scope="module")
def backend(tiny_model) -> GptlabBackend:
    return GptlabBackend.from_pretrained(tiny_model)


# --------------------------------------------------------------------------- metrics


def test_acc_norm_and_acc_bytes_differ_from_acc_where_lengths_differ():
    # acc: -2.5 wins (choice 1); per character: -1.5 vs -1.25, choice 1; per byte: -0.75 vs -1.25, choice 0.
    scores = metrics.mc_scores([-3.0, -2.5], ["éé", "ab"], gold=0)
    assert scores == {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 1.0}
    # Per character the long choice wins: -2/2 = -1 < -3/8.
    assert metrics.mc_scores([-2.0, -3.0], ["ab", "abcdefgh"], gold=1) == {
        "acc": 0.0,
        "acc_norm": 1.0,
        "acc_bytes": 1.0,
    }
    assert metrics.argmax([1.0, 3.0, 3.0]) == 1  # ties: the first, as numpy


def test_strict_and_flexible_extraction_differ():
    reference = "She sold 48 + 24 = 72 clips.\n#### 72"
    no_marker = "She sold 48 clips, then 24, so 72."
    strict = metrics.extract(no_marker, metrics.GSM8K_STRICT)
    flexible = metrics.extract(no_marker, metrics.GSM8K_FLEXIBLE, group_select=-1)
    assert (strict, flexible) == (metrics.INVALID, "72.")
    assert metrics.exact_match(strict, reference, metrics.GSM8K_IGNORE, True) == 0.0
    assert metrics.exact_match(flexible, reference, metrics.GSM8K_IGNORE, True) == 1.0
    marked = "48 + 24 = 72, minus 2 is 70\n#### 1,072"
    assert metrics.extract(marked, metrics.GSM8K_STRICT) == "1,072"
    assert metrics.exact_match("1,072", "#### 1072", metrics.GSM8K_IGNORE, True) == 1.0
    assert metrics.extract(" 995.", r"^\s*(-?\d+)\.") == "995"
    assert metrics.extract(" 995", r"^\s*(-?\d+)\.") == metrics.INVALID


def test_partial_credit_is_one_minus_normalised_edit_distance():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.partial_credit("124", "123") == pytest.approx(1 - 1 / 3)
    assert metrics.partial_credit("1234", "123") == pytest.approx(0.75)
    assert metrics.partial_credit("321", "123") == pytest.approx(1 - 2 / 3)
    assert metrics.partial_credit("123", "123") == 1.0
    assert metrics.partial_credit(metrics.INVALID, "45") == 0.0


def test_stderr_of_a_mean_is_lm_evals():
    values = [1.0, 0.0, 1.0, 1.0]
    assert metrics.mean_stderr(values) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert math.isnan(metrics.mean_stderr([1.0]))
    coin = [float(i % 4 != 0) for i in range(400)]  # p = 0.75
    boot = metrics.bootstrap_stderr(metrics.mean, coin, iters=300, seed=1)
    assert boot == metrics.bootstrap_stderr(metrics.mean, coin, iters=300, seed=1)
    assert boot == pytest.approx(metrics.mean_stderr(coin), rel=0.2)
    pairs = [(-math.log(2) * 8, 8), (-math.log(2) * 24, 8)]  # 32 bits over 16 bytes
    assert metrics.bits_per_byte(pairs) == pytest.approx(2.0)
    assert metrics.weighted_perplexity(pairs) == pytest.approx(4.0)


# --------------------------------------------------------------------------- encoding and scoring


def plain_scores(model: GPT, pairs) -> list[float]:
    """Each request alone, as lm-eval's hf backend computes it: no packing, no batching."""
    out = []
    for ctx, cont in pairs:
        ids = (ctx + cont)[-(model.config.block_size + 1) :]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1)
        out.append(sum(logprobs[len(ids) - 1 - len(cont) + j, t].item() for j, t in enumerate(cont)))
    return out


def scoring_requests() -> list[tuple[str, str]]:
    rng = random.Random(1)
    long = " ".join(rng.choices(WORDS, k=220))  # past the block size: cut from the left
    shots = " ".join(rng.choices(WORDS, k=60))  # a long shared prefix: run once for its rows
    requests = []
    for context in (
        "alpha beta gamma?\nAnswer:",
        "iota kappa",
        long,
        "mu mu mu ",
        shots + " eta?",
        shots + " mu kappa?",
    ):
        requests += [(context, " A"), (context, " beta gamma delta"), (context, " eta"), (context, " lambda mu iota")]
    return requests + [("", "alpha beta"), ("zeta", " theta")]


def test_scores_equal_a_plain_forward_whatever_the_batch_size(files, backend, monkeypatch):
    requests = scoring_requests()
    pairs = backend.encode_pairs(requests)
    expected = plain_scores(backend.model, pairs)
    prefix_runs = []
    run_prefix = backend._logits_after_prefix
    monkeypatch.setattr(backend, "_logits_after_prefix", lambda *a: prefix_runs.append(a[3]) or run_prefix(*a))
    by_size = {}
    for batch_size in (1, 7, 32):
        backend.counters.clear()
        by_size[batch_size] = backend.loglikelihood(requests, batch_size=batch_size)
        assert backend.counters["truncated"] == 4  # the four requests on the long context
    assert prefix_runs and min(prefix_runs) >= 32  # the rows sharing the shots ran them once
    for answers in by_size.values():
        assert [lp for lp, _ in answers] == pytest.approx(expected, abs=1e-4)
        assert [g for _, g in answers] == [g for _, g in by_size[1]]
    for a, b in zip(by_size[1], by_size[32]):
        assert abs(a[0] - b[0]) < 1e-4


def test_encoding_is_lm_evals(tiny_model, backend):
    tok = backend.tokenizer
    ctx, cont = backend.encode_pairs([("alpha beta? Answer: ", "A")])[0]
    assert (ctx, cont) == backend.encode_pairs([("alpha beta? Answer:", " A")])[0]  # the space moves
    assert ctx[0] == tok.bos_id and ctx == tok.encode("alpha beta? Answer:")
    assert ctx + cont == tok.encode("alpha beta? Answer: A")
    # The BOS lm-eval conditions an empty context on, and no second BOS for text starting with one.
    assert backend.encode_pairs([("", "alpha")])[0] == ([tok.bos_id], tok.encode("alpha", add_special_tokens=False))
    assert backend.encode([tok.bos_token + "alpha"]) == [tok.encode("alpha")]
    hf = HFBackend(tiny_model)
    assert hf.encode_pairs(scoring_requests()) == backend.encode_pairs(scoring_requests())


def test_a_continuation_merging_across_the_seam_is_detected(files, backend):
    tok = backend.tokenizer

    def merges(context: str, continuation: str) -> bool:
        """tok(context) is not a prefix of tok(context + continuation), which is longer than it."""
        ctx, whole = tok.encode(context), tok.encode(context + continuation)
        return whole[: len(ctx)] != ctx and len(whole) > len(ctx)

    # A word cut in two whose whole is one BPE token: tok("mu b") is not a prefix of tok("mu beta mu mu").
    context, continuation = next(
        (f"mu {w[:i]}", f"{w[i:]} mu mu")
        for w in WORDS
        for i in range(1, len(w))
        if merges(f"mu {w[:i]}", f"{w[i:]} mu mu")
    )
    assert not merges("mu", " " + continuation)
    backend.counters.clear()
    backend.loglikelihood([(context, continuation), ("mu", " " + continuation)])
    assert backend.counters["seam_merges"] == 1
    task = files / "seam.toml"
    write_jsonl(files / "seam.jsonl", [{"q": context, "a": continuation, "b": "x" + continuation}])
    task.write_text(
        'test = "seam.jsonl"\ndoc_to_text = "{q}"\ndoc_to_target = "{a}"\n'
        'choices = ["{a}", "{b}"]\ntarget_delimiter = ""\n'
    )
    with pytest.warns(UserWarning, match="merge with the end of their context"):
        result = evaluate(backend, [str(task)])
    assert result["results"]["seam"]["seam_merges"] >= 1


def test_rolling_windows_score_every_token_once():
    tokens = list(range(100, 111))
    windows = list(rolling_windows(tokens, prefix=0, max_length=4))
    assert [t for _, cont in windows for t in cont] == tokens
    assert windows[0] == ([0], tokens[:4])
    for ctx, cont in windows:
        assert len(ctx) + len(cont) <= 5 and ctx  # at most the model's length + the last token
    for ctx, cont in windows[1:]:
        assert ctx + cont == tokens[tokens.index(cont[-1]) - 4 : tokens.index(cont[-1]) + 1]


def test_rolling_loglikelihood_and_perplexity_task(files, backend):
    text = "alpha beta gamma delta"
    (rolling,) = backend.loglikelihood_rolling([text])
    assert rolling == pytest.approx(backend.loglikelihood([("", text)])[0][0], abs=1e-4)
    result = evaluate(backend, ["ppl"], files / "text.txt", return_samples=True)
    ppl = result["results"]["ppl"]
    records = result["samples"]
    total_lp, total_bytes = sum(r["logprob"] for r in records), sum(r["bytes"] for r in records)
    assert ppl["n"] == 4 and ppl["truncated"] == 0
    assert ppl["bits_per_byte"] == pytest.approx(-total_lp / total_bytes / math.log(2))
    assert ppl["byte_perplexity"] == pytest.approx(2 ** ppl["bits_per_byte"])
    assert ppl["bits_per_byte_stderr"] > 0


def test_hf_backend_agrees_with_gptlab(tiny_model, backend):
    hf = HFBackend(tiny_model)
    assert hf.max_length == TINY_MODEL_BLOCK
    requests = scoring_requests()
    ours, theirs = backend.loglikelihood(requests, batch_size=5), hf.loglikelihood(requests, batch_size=5)
    assert [lp for lp, _ in theirs] == pytest.approx([lp for lp, _ in ours], abs=1e-4)
    gen = [GenerationRequest("alpha beta", ("\n", " mu"), 12), GenerationRequest("Q: 12+41=? A:", ("\n",), 6)]
    assert smallest_greedy_gap(backend, gen) > 1e-4, "near-tie: equal texts would be luck; change the requests"
    assert hf.generate_until(gen, batch_size=2) == backend.generate_until(gen, batch_size=2)


def smallest_greedy_gap(backend: GptlabBackend, requests: list[GenerationRequest]) -> float:
    """The smallest top-1/top-2 logit gap over every greedy step of the requests (to their token budgets).
    On an untrained model two logits can be 1e-6 apart, and two implementations may then pick either."""
    gaps = []
    for request in requests:
        context = backend.encode([request.context])[0][-(backend.max_length - request.max_new_tokens) :]
        new = Engine(backend.model).generate([context], request.max_new_tokens, temperature=0)[0]
        with torch.no_grad():
            logits = backend.model(torch.tensor([context + new]))[0, len(context) - 1 : -1]
        top2 = logits.topk(2, dim=-1).values
        gaps.append(float((top2[:, 0] - top2[:, 1]).min()))
    return min(gaps)


# --------------------------------------------------------------------------- prompts and tasks


def test_prompts_are_the_documented_formats(files):
    mmlu = load_task("mmlu", files / "mmlu", need_shots=True)
    doc = mmlu.docs[0]
    shot = mmlu.fewshot[doc.subject][0].data
    assert doc.subject == "greek" and doc.doc_id == 0
    assert mmlu.context(doc, mmlu.shots(doc, 1, seed=0)) == (
        "The following are multiple choice questions (with answers) about greek.\n\n"
        f"{shot['question'].strip()}\nA. {shot['A']}\nB. {shot['B']}\nC. {shot['C']}\nD. {shot['D']}\n"
        f"Answer: {shot['answer']}\n\n"
        f"{doc.data['question'].strip()}\nA. {doc.data['A']}\nB. {doc.data['B']}\nC. {doc.data['C']}\n"
        f"D. {doc.data['D']}\nAnswer:"
    )
    assert mmlu.shots(doc, 3, seed=0) == mmlu.fewshot["greek"][:3]  # first-n, whatever the seed

    world = files / "world"
    words = load_task("words_reverse", world)
    doc = words.docs[0]
    shots = words.shots(doc, 2, seed=0)
    assert (
        words.context(doc, shots) == "".join(f"{s.data['input']} -> {s.data['output']}\n" for s in shots) + "alpha ->"
    )
    assert words.shots(doc, 3, seed=0)[:2] == shots  # nested: k shots are the first k of k+1
    assert load_task("words_reverse", world, limit=1).shots(doc, 2, seed=0) == shots  # --limit changes nothing
    assert any(words.shots(doc, 2, seed=s) != shots for s in range(1, 6))

    direct = load_task("arith_add_2", world)
    doc, shot = direct.docs[0], direct.fewshot[None][0]
    assert direct.context(doc, [shot]) == "Q: 11+41=? A: 52.\nQ: 10+40=? A:"
    cot = load_task("arith_add_2", world, cot=True)
    assert cot.context(doc, [shot]) == (
        "Q: 11+41=? A: Let's think step by step. The answer is 52.\nQ: 10+40=? A: Let's think step by step."
    )
    assert direct.reference(doc.data) == "50" and cot.strict_regex == r"The answer is (-?\d+)"

    gsm = files / "gsm8k"
    write_jsonl(gsm / "train.jsonl", [{"question": "1+1?", "answer": "One and one.\n#### 2"}])
    write_jsonl(gsm / "test.jsonl", [{"question": "2+3?", "answer": "Two and three.\n#### 5"}])
    gsm8k = load_task("gsm8k", gsm)
    doc = gsm8k.docs[0]
    assert gsm8k.context(doc, gsm8k.shots(doc, 1, seed=0)) == (
        "Question: 1+1?\nAnswer: One and one.\n#### 2\n\nQuestion: 2+3?\nAnswer:"
    )
    assert gsm8k.until == ("Question:", "</s>", "<|im_end|>")


def test_toml_generation_task(files, backend):
    write_jsonl(files / "gen.jsonl", [{"w": w, "r": w[::-1]} for w in WORDS[:4]])
    task = files / "rev.toml"
    task.write_text(
        'name = "rev"\ntype = "generate_until"\ntest = "gen.jsonl"\n'
        'fewshot = "gen.jsonl"\nfewshot_sampler = "first_n"\n'
        'doc_to_text = "{w} ->"\ndoc_to_target = "{r}"\nfewshot_delimiter = "\\n"\n'
        "max_new_tokens = 4\npartial_credit = true\n"
    )
    result = evaluate(backend, [str(task)], shots=[2], return_samples=True)
    scores = result["results"]["rev"]
    assert scores["n"] == 4 and set(scores) >= {"exact_match", "exact_match_stderr", "partial_credit"}
    sample = result["samples"][0]
    assert sample["target"] == "ahpla" and "\n" not in sample["output"]
    assert sample["prediction"] == sample["output"].strip()
    # Shots drawn from the test file itself never include the question (nor its answer).
    rev = load_task(str(task), None)
    for doc in rev.docs:
        assert doc.doc_id not in [s.doc_id for s in rev.shots(doc, 3, seed=0)]
    with pytest.raises(UserError, match="holds only 3 example"):
        rev.check_shots(4)


# --------------------------------------------------------------------------- parity with lm-evaluation-harness


REVERSE_TOML = """name = "reverse"
type = "generate_until"
test = "reverse_test.jsonl"
fewshot = "reverse_dev.jsonl"
fewshot_sampler = "first_n"
doc_to_text = "{w} ->"
doc_to_target = "{r}"
fewshot_delimiter = "\\n"
until = ["\\n", "ta"]
max_new_tokens = 12
"""


def lm_eval_generation_task(folder: Path) -> dict:
    """REVERSE_TOML as lm-eval's task config."""
    return {
        "task": "local_reverse",
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(folder / "reverse_test.jsonl"), "dev": str(folder / "reverse_dev.jsonl")}
        },
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "generate_until",
        "doc_to_text": "{{w}} ->",
        "doc_to_target": "{{r}}",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n",
        "generation_kwargs": {"until": ["\n", "ta"], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def lm_eval_perplexity_task(documents: Path) -> dict:
    """gptlab's ppl task as lm-eval's wikitext scores a document: its rolling log-likelihood, words
    (split on whitespace) and UTF-8 bytes."""
    return {
        "task": "local_ppl",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(documents)}},
        "test_split": "test",
        "num_fewshot": 0,
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        "metadata": {"version": 1.0},
    }


@pytest.fixture(scope="module")
def parity_model(tiny_model, tmp_path_factory) -> Path:
    """tiny_model's tokenizer and shape with weights drawn 15x larger: its greedy text depends on the prompt
    (tiny_model writes the same for every prompt) and its top logits are far enough apart to compare exactly."""
    model = GPT.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("parity_model") / "model"
    model.save_pretrained(folder, tokenizer=Tokenizer.from_pretrained(tiny_model))
    return folder


@pytest.fixture(scope="module")
def parity_backend(parity_model) -> GptlabBackend:
    return GptlabBackend.from_pretrained(parity_model)


@pytest.fixture(scope="module")
def lm_eval_run(files, parity_model, tmp_path_factory) -> Path:
    """One `lm_eval --model hf` run of parity_model (one start-up for every parity test) over local
    tasks: the MMLU folder's subjects and a generation task (REVERSE_TOML) 5-shot, and the ppl task over
    files/text.txt. Returns a folder with lm-eval's output in out/ and gptlab's task file reverse.toml."""
    from gptlab.data import iter_documents
    from gptlab.eval.lmeval import run_lm_eval_hf, write_mmlu_tasks, write_task

    root = tmp_path_factory.mktemp("lm_eval")
    rng = random.Random(2)
    write_jsonl(root / "reverse_dev.jsonl", [{"w": w, "r": w[::-1]} for w in WORDS[:5]])
    tests = [{"w": w, "r": w[::-1]} for w in WORDS[5:]]
    long = " ".join(rng.choices(WORDS, k=400))  # past the model's length with its shots: cut from the left
    write_jsonl(root / "reverse_test.jsonl", [*tests, {"w": long, "r": long[::-1]}])
    (root / "reverse.toml").write_text(REVERSE_TOML)
    write_jsonl(root / "ppl.jsonl", [{"text": t} for t in iter_documents(files / "text.txt")])
    group = write_mmlu_tasks(files / "mmlu", root / "tasks")
    generation = write_task(root / "tasks", lm_eval_generation_task(root))
    perplexity = write_task(root / "tasks", lm_eval_perplexity_task(root / "ppl.jsonl"))
    tasks = ",".join((group, generation, perplexity))
    run = run_lm_eval_hf(parity_model, root / "tasks", tasks, root / "out", shots=5, batch_size=7)
    assert run.returncode == 0, run.stderr[-3000:]
    return root


@pytest.mark.slow
def test_parity_with_lm_evaluation_harness(files, lm_eval_run, parity_backend):
    from gptlab.eval.lmeval import read_mmlu_samples

    theirs = read_mmlu_samples(lm_eval_run / "out", "local_mmlu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning
        ours = evaluate(parity_backend, ["mmlu"], files / "mmlu", shots=[5], return_samples=True)
    assert 0 < ours["results"]["mmlu"]["truncated"] < 4 * 12  # both paths: cut and whole
    assert len(ours["samples"]) == len(theirs) == 12
    clear = 0
    for sample in ours["samples"]:
        reference = theirs[(sample["subject"], sample["doc_id"])]
        assert sample["logprobs"] == pytest.approx(reference, abs=1e-3)
        first, second = sorted(reference, reverse=True)[:2]
        if first - second > 2e-3:  # closer, the two sides' 1e-3 differences may order them either way
            assert sample["prediction"] == metrics.argmax(reference)
            clear += 1
    assert clear >= 8, "too many near-ties among the choices to compare predictions: change the seed"


@pytest.mark.slow
def test_generation_parity_with_lm_evaluation_harness(lm_eval_run, parity_backend):
    """Per sample, the same 5-shot prompt and the same text out: left truncation of a long prompt, the
    token budget and the stop strings (checked to matter here) cut as lm-eval's hf backend cuts them."""
    from gptlab.eval.lmeval import read_samples

    theirs = read_samples(lm_eval_run / "out", "local_reverse")
    task = load_task(str(lm_eval_run / "reverse.toml"), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning
        ours = evaluate(parity_backend, [str(lm_eval_run / "reverse.toml")], shots=[5], return_samples=True)
    assert ours["results"]["reverse"]["truncated"] == 1
    assert len(ours["samples"]) == len(theirs) == len(task.docs) == 8
    contexts = [task.context(doc, task.shots(doc, 5, seed=0)) for doc in task.docs]
    for context, sample in zip(contexts, ours["samples"]):
        record = theirs[sample["doc_id"]]
        assert record["arguments"]["gen_args_0"]["arg_0"] == context
        assert sample["output"] == record["filtered_resps"][0], sample["doc_id"]
    assert len({s["output"] for s in ours["samples"]}) >= 4  # outputs that depend on the prompt
    unstopped_requests = [GenerationRequest(c, (), 12) for c in contexts]
    assert smallest_greedy_gap(parity_backend, unstopped_requests) > 1e-4, "near-tie: equal outputs would be luck"
    unstopped = parity_backend.generate_until(unstopped_requests)
    assert sum(o != s["output"] for o, s in zip(unstopped, ours["samples"])) >= 2  # the stops cut some outputs


@pytest.mark.slow
def test_rolling_windows_parity_with_lm_evaluation_harness(lm_eval_run, parity_backend, monkeypatch):
    """Per document, the log-likelihood of lm-eval's rolling windows, across the model's length; and
    the perplexities lm-eval computes from them, as gptlab's ppl task computes them.

    lm-eval's hf backend encodes a document with the tokenizer's special tokens, so it also scores
    P(BOS | BOS) (docs/eval.md: gptlab does not): the same windows are gptlab's over BOS + the text."""
    from gptlab.eval.lmeval import read_samples

    theirs = read_samples(lm_eval_run / "out", "local_ppl")
    texts = [theirs[i]["doc"]["text"] for i in sorted(theirs)]
    their_logprobs = [float(theirs[i]["filtered_resps"][0]) for i in sorted(theirs)]
    backend = parity_backend
    assert len(texts) == 4 and max(len(ids) for ids in backend.encode(texts)) > backend.max_length  # 2+ windows
    ours = backend.loglikelihood_rolling([backend.bos_text + t for t in texts], batch_size=3)
    assert ours == pytest.approx(their_logprobs, rel=1e-6)
    # Their per-document figures through gptlab's ppl task give their perplexities: words, bytes and formulas.
    results = json.loads(next((lm_eval_run / "out").rglob("results_*.json")).read_text())["results"]["local_ppl"]
    monkeypatch.setattr(backend, "loglikelihood_rolling", lambda texts, batch_size: their_logprobs)
    ppl = evaluate(backend, ["ppl"], lm_eval_run / "ppl.jsonl")["results"]["ppl"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ppl[metric] == pytest.approx(results[f"{metric},none"], rel=1e-9), metric


# --------------------------------------------------------------------------- the command


def test_eval_command_writes_results_and_samples(files, tiny_model, tmp_path, capfd):
    out, samples = tmp_path / "r" / "results.json", tmp_path / "samples.jsonl"
    run = gptlab_in_process(
        capfd,
        "eval",
        "--model",
        tiny_model,
        "--tasks",
        "world_mmlu,arith_add_2,words_reverse",
        "--data",
        files / "world",
        "--shots",
        "0,1",
        "--limit",
        "2",
        "--batch-size",
        "3",
        "--out",
        out,
        "--samples",
        samples,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["config"]["shots"] == [0, 1] and results["config"]["model"] == str(tiny_model)
    mmlu = results["results"]["world_mmlu"]["1-shot"]
    assert mmlu["n"] == 4 and {"acc", "acc_stderr", "acc_norm", "acc_bytes"} <= set(mmlu)
    assert set(mmlu["subjects"]) == {"greek", "pure logic"}
    assert {"exact_match", "exact_match_flexible", "partial_credit"} <= set(results["results"]["arith_add_2"]["0-shot"])
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 2 * (4 + 2 + 2)
    mc = next(r for r in records if r["task"] == "world_mmlu" and r["shots"] == 1)
    assert set(mc) == {"task", "subject", "doc_id", "shots", "prediction", "target", "correct", "logprobs"}
    assert len(mc["logprobs"]) == 4 and mc["correct"] == (mc["prediction"] == mc["target"])
    gen = next(r for r in records if r["task"] == "words_reverse")
    assert {"task", "doc_id", "shots", "prediction", "target", "correct"} <= set(gen) and "subject" not in gen
    assert "world_mmlu" in run.stdout and "exact_match" in run.stdout
    assert format_table(results).splitlines()[0] in run.stdout
    assert run.stdout.splitlines()[-1] == f"results -> {out}; samples -> {samples}"


def test_eval_without_out_prints_the_table_and_writes_nothing(files, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = gptlab_main(
        ["eval", "--model", str(tiny_model), "--tasks", "arith_add_2", "--data", str(files / "world"), "--limit", "2"]
    )
    out = capsys.readouterr().out
    assert code == 0 and out.splitlines()[0].startswith("task") and "exact_match" in out
    assert not any(tmp_path.iterdir())


def eval_error(capsys, *args) -> str:
    """Run `gptlab eval` in this process; return its one stderr line after checking exit code 2."""
    code = gptlab_main(["eval", *map(str, args)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gptlab: error: "), err
    return lines[0]


def test_bad_input_ends_with_one_line(files, tiny_model, tmp_path, capsys):
    model, world = tiny_model, files / "world"
    bad = tmp_path / "bad"
    for split in ("dev", "test"):
        for f in (files / "mmlu" / split).iterdir():
            (bad / split).mkdir(parents=True, exist_ok=True)
            (bad / split / f.name).write_text(f.read_text())
    broken = bad / "test" / "greek_test.csv"
    lines = broken.read_text().splitlines()
    lines[2] = "a question?,x,y,z,B"
    broken.write_text("\n".join(lines) + "\n")
    line = eval_error(capsys, "--model", model, "--tasks", "mmlu", "--data", bad, "--out", tmp_path / "r.json")
    assert str(broken) in line and "line 3" in line and "6 columns" in line

    line = eval_error(
        capsys,
        "--model",
        model,
        "--tasks",
        "words_reverse",
        "--data",
        world,
        "--shots",
        "0,4",
        "--out",
        tmp_path / "r.json",
    )
    assert "4 shots" in line and "reverse_fewshot.jsonl" in line and "only 3" in line

    no_dev = tmp_path / "no_dev"
    (no_dev / "test").mkdir(parents=True)
    (no_dev / "test" / "greek_test.csv").write_text((files / "mmlu" / "test" / "greek_test.csv").read_text())
    line = eval_error(
        capsys, "--model", model, "--tasks", "mmlu", "--data", no_dev, "--shots", "5", "--out", tmp_path / "r.json"
    )
    assert "greek_dev.csv does not exist" in line and "dev split" in line

    line = eval_error(capsys, "--model", model, "--tasks", "world_mmlx", "--data", world, "--out", tmp_path / "r.json")
    assert "unknown task 'world_mmlx'" in line and "did you mean world_mmlu" in line
    line = eval_error(capsys, "--model", model, "--tasks", "arith_add_9", "--data", world, "--out", tmp_path / "r.json")
    assert "unknown task 'arith_add_9'" in line and "arith_add_2" in line
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- OpenAI-compatible servers


class _FakeCompletions(http.server.BaseHTTPRequestHandler):
    """Echoes "Answer: A" as tokens "Answer", ":", " A" with fixed log-probs; generates " 42\\nQ"."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("echo"):
            choices = [
                {
                    "index": i,
                    "text": p,
                    "logprobs": {
                        "tokens": ["Answer", ":", " A"],
                        "token_logprobs": [None, -1.0, -0.5],
                        "text_offset": [0, 6, 7],
                        "top_logprobs": [None, {":": -1.0}, {" B": -0.1, " A": -0.5}],
                    },
                }
                for i, p in enumerate(body["prompt"])
            ]
        else:
            choices = [{"index": 0, "text": " 42\nQ"}]
        data = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_backend_reads_echoed_logprobs(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy"):  # a proxy that is down, as a company
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # machine may set one: loopback goes around it (conftest)
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeCompletions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{server.server_port}/v1", "tiny")
        assert backend.loglikelihood([("Answer:", " A")]) == [(-0.5, False)]
        assert backend.loglikelihood_rolling(["Answer: A"]) == [-1.5]
        assert backend.generate_until([GenerationRequest("Q: 40+2=? A:", ("\n",), 8)]) == [" 42"]
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- instructions and chat


def test_world_instruct_prompts_shots_of_the_same_family_never_the_question(quick_world):
    task = load_task("world_instruct", quick_world, limit=3)
    families = {d.subject for d in task.docs}
    assert len(task.docs) == 3 * len(families)
    for doc in task.docs:
        shots = task.shots(doc, 2, seed=0)
        assert all(s.subject == doc.subject and s.doc_id != doc.doc_id for s in shots)
        question = doc.data["messages"][-2]["content"]
        assert (
            task.context(doc, shots)
            == "".join(
                f"Q: {s.data['messages'][-2]['content']} A: {s.data['messages'][-1]['content']}\n" for s in shots
            )
            + f"Q: {question} A:"
        )
    whole = load_task("world_instruct", quick_world)
    by_id = {d.doc_id: d for d in whole.docs}
    assert all(
        task.shots(d, 2, seed=0) == whole.shots(by_id[d.doc_id], 2, seed=0) for d in task.docs
    )  # --limit changes no prompt
    smallest = min(len(pool) for pool in whole.fewshot.values())
    task.check_shots(smallest - 1)
    with pytest.raises(UserError, match=f"holds only {smallest - 1} example"):
        task.check_shots(smallest)  # the family's questions minus the question itself


def test_chat_context_encodes_to_the_chat_template(backend):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "alpha -> ?"}]
    context = backend.chat_context(messages)
    assert backend.encode([context])[0] == backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert backend.end_of_turn == ("<|end|>",)


def test_oracle_scores_world_instruct_answers_with_and_without_chat(quick_world, backend, monkeypatch):
    task = load_task("world_instruct", quick_world, limit=2)
    answers = {d.data["messages"][-2]["content"]: d.data["messages"][-1]["content"] for d in task.docs}
    asked = []

    def answer_every_question(requests, batch_size=32):
        asked.extend(requests)
        # The last user message of a plain prompt is "Q: ... A:"; of a chat prompt, before <|end|>.
        return [
            " " + next(a for q, a in answers.items() if r.context.endswith((f"Q: {q} A:", f"{q}<|end|><|assistant|>")))
            for r in requests
        ]

    monkeypatch.setattr(backend, "generate_until", answer_every_question)
    for chat in (False, True):
        asked.clear()
        out = evaluate(backend, ["world_instruct"], quick_world, shots=[1], limit=2, chat=chat, return_samples=True)
        result = out["results"]["world_instruct"]
        assert result["exact_match"] == 1.0 and result["n"] == len(task.docs)
        assert set(result["subjects"]) == {d.subject for d in task.docs}
        assert all(("<|assistant|>" in r.context) == chat for r in asked)
        assert all(r.until == (("<|end|>",) if chat else ("\n",)) for r in asked)
    monkeypatch.setattr(backend, "generate_until", lambda requests, batch_size=32: [" I do not know."] * len(requests))
    assert (
        evaluate(backend, ["world_instruct"], quick_world, limit=1)["results"]["world_instruct"]["exact_match"] == 0.0
    )
    with pytest.raises(UserError, match="--chat applies to generation tasks"):
        evaluate(backend, ["world_mmlu"], quick_world, limit=1, chat=True)
