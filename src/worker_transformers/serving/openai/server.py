"""The local OpenAI-compatible server's HTTP side, in front of a handler (the entry point that starts the worker
for it is openai_server.py: `make openai-server`).

Each request becomes the job RunPod's OpenAI proxy makes of it, `{"openai_route": "/v1/...", "openai_input":
<body>}`, and runs through the worker's real handler after the worker's real startup, so a client sees here what
it sees from the endpoint. It serves `/openai/v1/...`, the endpoint's paths, and the same without `/openai`. A
failed job becomes an HTTP error with OpenAI's status code and error body; a stream is sent as it comes. It is
built on FastAPI and uvicorn, which the runpod SDK ships for its own local API.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from worker_transformers.serving.handlers import Handler
from worker_transformers.serving.openai.protocol import ROUTES, error_body

# OpenAI's status for each kind of error; a code of its own overrides the kind's.
STATUS_OF_KIND = {"invalid_request_error": 400, "server_error": 500}
STATUS_OF_CODE = {"model_not_found": 404, "unknown_route": 404}


def make_app(handler: Handler) -> FastAPI:
    app = FastAPI(title="worker-transformers: local OpenAI-compatible API", openapi_url=None)

    async def answer(request: Request) -> Response:
        route = request.url.path.removeprefix("/openai")
        body: Any = {}
        if request.method == "POST":
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return _error(400, "the request body is not valid JSON; send a JSON object", "invalid_request_error")
        job = {"id": f"local-{uuid.uuid4().hex}", "input": {"openai_route": route, "openai_input": body}}
        items = aiter(handler(job))
        first = await anext(items, None)
        if isinstance(first, dict) and isinstance(first.get("error"), str):  # a failed job (a Response has error: null)
            return _failed(first["error"])
        if isinstance(first, str):
            return StreamingResponse(_stream(first, items), media_type="text/event-stream")
        return JSONResponse(first)

    for route in ROUTES:
        methods = ["GET"] if route == "/v1/models" else ["POST"]
        for path in (f"/openai{route}", route):
            app.add_api_route(path, answer, methods=methods)
    return app


async def _stream(first: str, rest: AsyncIterator[Any]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


def _failed(error: str) -> JSONResponse:
    """The HTTP answer to a failed job: its OpenAI error object with that error's status, or, for a worker whose
    startup failed (its jobs fail with a line of text), that line as a 503."""
    try:
        body = json.loads(error)["error"]
    except (json.JSONDecodeError, TypeError, KeyError):
        return _error(503, error, "server_error", "startup_failed")
    status = STATUS_OF_CODE.get(body.get("code"), STATUS_OF_KIND.get(body.get("type"), 500))
    return JSONResponse({"error": body}, status_code=status)


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, None, code, kind), status)
