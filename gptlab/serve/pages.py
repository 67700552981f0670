"""The server's web pages (the chat page, the arena and its leaderboard): one HTML file each in
``static/``, plain JavaScript with no build step, sent with a Content-Security-Policy that lets only
the page's own script run and talk only to the server that sent it."""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import Response

from gptlab.serve.protocol import ApiError

STATIC = Path(__file__).parent / "static"
# The pages' own script and styles only; they talk to this server and nothing else.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def page(name: str) -> Response:
    """The page ``static/NAME`` with the policy; a 404 if the installation lacks it."""
    path = STATIC / name
    if not path.is_file():
        raise ApiError(404, f"the page {name} is not installed here (gptlab/serve/static/{name} is missing)")
    headers = {"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"}
    return Response(path.read_bytes(), media_type="text/html; charset=utf-8", headers=headers)
