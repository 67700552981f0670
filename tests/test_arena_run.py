"""The arena's judges, tournaments and board (gptlab/arena/judges.py, run.py, board.py), the `gptlab arena`
command, and the batched chat replies that the arena and the demo share (gptlab.chat.chat_replies)."""

from __future__ import annotations

import pytest

from gptlab.chat import ChatSession, chat_replies
from gptlab.engine import Engine

pytestmark = pytest.mark.usefixtures("on_one_thread")

CONVERSATIONS = [
    [{"role": "user", "content": "alpha beta"}],
    [{"role": "system", "content": "gamma"}, {"role": "user", "content": "delta epsilon zeta eta"}],
    [{"role": "user", "content": "theta"}],
]


def test_chat_replies_in_batches_equal_one_chat_turn_each(tiny_model):
    """Batched, left-padded replies are what `gptlab chat` says to each conversation alone (greedy)."""
    engine = Engine.from_pretrained(tiny_model)
    batched = chat_replies(engine, CONVERSATIONS, max_new_tokens=12, batch_size=2)
    alone = []
    for conversation in CONVERSATIONS:
        system = conversation[0]["content"] if conversation[0]["role"] == "system" else None
        session = ChatSession(engine, system=system, max_new_tokens=12, temperature=0.0)
        alone.append("".join(session.reply(conversation[-1]["content"])))
    assert batched == alone and any(batched)
