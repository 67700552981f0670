"""Who decides a battle: TinyWorld's oracle, a reward model, an LLM asked in both orders, or a person.

Every judge answers a batch of battles at once with one of ``WINNERS`` per battle (model_a's answer
is ``answers_a[i]``). ``load_judge`` builds one from the name a user types:

- ``oracle``: TinyWorld's hidden preference (``gptlab.world.oracle.Oracle.judge``): a correct answer
  beats a wrong one, style rules decide between equally correct ones, two wrong answers are
  ``tie (bothbad)``. It needs the world folder whose facts it checks (``--world DIR``).
- ``reward:DIR``: a reward model (``gptlab reward``) scores both answers; ``model_a`` wins when
  ``r_a - r_b >= tie_band``, ``model_b`` when ``r_b - r_a >= tie_band``, otherwise a tie. The
  default band, ``TIE_BAND`` = 0.1, is a preference probability ``σ(0.1)`` of 52.5% under the
  reward model's own Bradley-Terry reading: closer calls than that are ties.
- ``llm:DIR``: any model folder ``Engine.from_pretrained`` loads (gptlab's, or a local Hugging Face
  Llama or GPT-2 folder) reads ``DEFAULT_TEMPLATE`` (or the user's, with the placeholders
  ``{question}``, ``{answer_1}``, ``{answer_2}``) through its chat template when its tokenizer has
  gptlab's chat tokens, else as plain text followed by ``PLAIN_CUE``. Its verdict is read
  deterministically, never sampled: the log-probabilities of the labels ``1`` and ``2`` as the
  continuation (lm-eval's loglikelihood request, through the evaluation backend), the larger one
  wins. It is asked twice, each answer once in first place (LLM judges favour a position, MT-Bench
  found); only a verdict both orders agree on counts, any disagreement is a ``tie``.
- ``human``: people vote on the arena page of ``gptlab serve --arena``; ``arena run`` refuses it.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

from gptlab.align.reward import RewardScorer
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.eval import Backend, GptlabBackend
from gptlab.tokenizer import CHAT_TEMPLATE
from gptlab.world.oracle import Oracle

TIE_BAND = 0.1  # reward judge: |r_a - r_b| below this is a tie (σ(0.1) = 52.5%)
JUDGES = "oracle, reward:DIR or llm:DIR"
PLACEHOLDERS = ("{question}", "{answer_1}", "{answer_2}")
DEFAULT_TEMPLATE = """\
Two assistants answered the same question. Which answer is better? A correct answer beats a wrong \
one; between equally correct answers, the clear, concise one is better.

Question: {question}

Answer 1: {answer_1}

Answer 2: {answer_2}

Reply with the number of the better answer: 1 or 2."""
PLAIN_CUE = "\nBetter answer:"  # after the template, for a model without a chat template; the label follows
LABELS = ("1", "2")


class Judge(Protocol):
    """Decides battles: ``name`` is what battles record as their judge."""

    name: str

    def judge(self, prompts: list[list[dict]], answers_a: list[str], answers_b: list[str]) -> list[str]:
        """One of ``WINNERS`` per battle."""
        ...


class OracleJudge:
    """TinyWorld's oracle, without noise."""

    def __init__(self, world: str | os.PathLike):
        self.name, self.oracle = "oracle", Oracle(world)

    def judge(self, prompts: list[list[dict]], answers_a: list[str], answers_b: list[str]) -> list[str]:
        return [self.oracle.judge(p, a, b) for p, a, b in zip(prompts, answers_a, answers_b)]


class RewardJudge:
    """A reward model's scores, a tie within ``tie_band`` of each other."""

    def __init__(self, scorer: RewardScorer, name: str, tie_band: float = TIE_BAND):
        self.name, self.scorer, self.tie_band = name, scorer, tie_band

    def judge(self, prompts: list[list[dict]], answers_a: list[str], answers_b: list[str]) -> list[str]:
        rewards = self.scorer.score(prompts + prompts, answers_a + answers_b)
        return [margin_verdict(r_a - r_b, self.tie_band) for r_a, r_b in zip(rewards, rewards[len(prompts) :])]


def margin_verdict(margin: float, tie_band: float) -> str:
    """The verdict on model_a's score minus model_b's: a tie when it is under ``tie_band`` either way (or 0)."""
    if abs(margin) < tie_band or margin == 0:
        return "tie"
    return "model_a" if margin > 0 else "model_b"


class LlmJudge:
    """A language model asked which of two answers is better, in both orders (see the module docstring).

    ``backend``: the model behind lm-eval's loglikelihood request (``GptlabBackend`` for a folder)."""

    def __init__(self, backend: Backend, name: str, template: str = DEFAULT_TEMPLATE, chat: bool = True):
        check_template(template)
        self.backend, self.name, self.template, self.chat = backend, name, template, chat

    def context(self, prompt: list[dict], answer_1: str, answer_2: str) -> str:
        """What the judge reads before it names the better answer."""
        text = self.template
        for placeholder, value in zip(PLACEHOLDERS, (question_text(prompt), answer_1, answer_2)):
            text = text.replace(placeholder, value)
        if self.chat:
            return self.backend.chat_context([{"role": "user", "content": text}])
        return text.rstrip() + PLAIN_CUE

    def judge(self, prompts: list[list[dict]], answers_a: list[str], answers_b: list[str]) -> list[str]:
        labels = LABELS if self.chat else tuple(" " + label for label in LABELS)
        requests = []
        for prompt, a, b in zip(prompts, answers_a, answers_b):
            for first, second in ((a, b), (b, a)):
                context = self.context(prompt, first, second)
                requests += [(context, label) for label in labels]
        logprobs = [logprob for logprob, _ in self.backend.loglikelihood(requests)]
        verdicts = []
        for i in range(len(prompts)):
            a_first_1, a_first_2, b_first_1, b_first_2 = logprobs[4 * i : 4 * i + 4]
            # In the first order answer 1 is model_a's, in the second it is model_b's.
            prefers_a = (a_first_1 > a_first_2, b_first_2 > b_first_1)
            prefers_b = (a_first_2 > a_first_1, b_first_1 > b_first_2)
            verdicts.append("model_a" if all(prefers_a) else "model_b" if all(prefers_b) else "tie")
        return verdicts


def question_text(prompt: list[dict]) -> str:
    """The question a judge reads: a lone user message as it is, a longer conversation as a transcript."""
    if len(prompt) == 1:
        return str(prompt[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user').capitalize()}: {m.get('content', '')}" for m in prompt)


def check_template(template: str) -> None:
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise UserError(
            f"the judge template lacks {', '.join(missing)}: it must hold {', '.join(PLACEHOLDERS)} "
            "(the question and the two answers)"
        )


def load_judge(
    spec: str,
    world: str | os.PathLike | None = None,
    device: str = "cpu",
    template: str | None = None,
    tie_band: float | None = None,
) -> Judge:
    """The judge a user names (see the module docstring); anything that cannot load is one line."""
    kind, _, folder = spec.partition(":")
    if kind == "human" and not folder:
        raise UserError(
            "the human judge is people voting on the arena page: start `gptlab serve --arena NAME=DIR,...` and vote "
            f"at /arena; `arena run` takes {JUDGES}"
        )
    if kind not in ("oracle", "reward", "llm") or (kind == "oracle") == bool(folder):
        raise UserError(f"unknown judge {spec!r}: use {JUDGES} (DIR a model folder)")
    _refuse_options_of_other_judges(kind, world, template, tie_band)
    if kind == "oracle":
        if world is None:
            raise UserError("the oracle judge needs the TinyWorld it knows the answers of: add --world DIR")
        return OracleJudge(world)
    if kind == "reward":
        band = TIE_BAND if tie_band is None else tie_band
        if not (math.isfinite(band) and band >= 0):
            raise UserError(f"--tie-band must be a finite number >= 0 (0: only equal rewards tie), got {band}")
        return RewardJudge(RewardScorer.from_pretrained(folder, device=device), spec, band)
    engine = Engine.from_pretrained(folder, device=device)
    chat = engine.tokenizer.chat_template == CHAT_TEMPLATE  # the template gptlab renders; any other: plain text
    return LlmJudge(GptlabBackend.from_engine(engine), spec, DEFAULT_TEMPLATE if template is None else template, chat)


def _refuse_options_of_other_judges(kind: str, world, template, tie_band) -> None:
    """An option the chosen judge would ignore is a mistake worth one line (a template given to a reward judge)."""
    for option, value, owner in (
        ("--world", world, "oracle"),
        ("--judge-template", template, "llm"),
        ("--tie-band", tie_band, "reward"),
    ):
        if value is not None and kind != owner:
            raise UserError(f"{option} is for the {owner} judge, not {kind}: drop it or choose that judge")
