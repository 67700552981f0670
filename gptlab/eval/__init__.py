"""The evaluation harness: lm-evaluation-harness's model contract, its prompts and metrics,
and the tasks gptlab's story needs (MMLU, GSM8K, TinyWorld's world_mmlu / arithmetic / word
tasks, perplexity, TOML task files). See docs/eval.md.

    from gptlab.eval import GptlabBackend, evaluate
    results = evaluate(GptlabBackend(model, tokenizer), ["world_mmlu", "words_reverse"], "data/world", shots=[0, 5])
"""

from gptlab.eval.backends import Backend, GenerationRequest, GptlabBackend, HFBackend, OpenAIBackend, load_backend
from gptlab.eval.harness import evaluate, format_table, warnings_as_lines, write_results, write_samples

__all__ = [
    "Backend",
    "GenerationRequest",
    "GptlabBackend",
    "HFBackend",
    "OpenAIBackend",
    "load_backend",
    "evaluate",
    "format_table",
    "warnings_as_lines",
    "write_results",
    "write_samples",
]
