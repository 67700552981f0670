"""``gptlab serve``: an OpenAI-compatible server over continuous batching, and its chat page.

``create_app(models, ...)`` builds the FastAPI app (``app.py``); one scheduler thread per model
owns its engine's ``Scheduler`` (``worker.py``); request bodies and errors are OpenAI's
(``protocol.py``), turned into scheduler requests and back into responses by ``generate.py`` and
``shapes.py``; ``metrics.py`` writes Prometheus' text format; ``arena.py`` runs the arena's battles
and votes; ``pages.py`` hands out the web pages of ``static/``. Needs ``pip install 'gptlab[serve]'``.
"""

from gptlab.serve.app import create_app

__all__ = ["create_app"]
