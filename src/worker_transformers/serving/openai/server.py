"""A local OpenAI-compatible server, for developing against the worker with any OpenAI client:
`python -m worker_transformers.serving.openai.server [--host 127.0.0.1] [--port 8000]` (`make openai-server`).

Each request becomes the job RunPod's OpenAI proxy makes of it, `{"openai_route": "/v1/...", "openai_input":
<body>}`, and runs through the worker's real handler after the worker's real startup, so a client sees here what
it sees from the endpoint. It serves `/openai/v1/...`, the endpoint's paths, and the same without `/openai`. A
failed job becomes an HTTP error with OpenAI's status code and error body; a stream is sent as it comes. It is
built on FastAPI and uvicorn, which the runpod SDK ships for its own local API.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from worker_transformers.serving.handlers import Handler

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions")
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
        if isinstance(first, dict) and "error" in first:
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
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from worker_transformers.worker import start_worker

    parser = argparse.ArgumentParser(prog="python -m worker_transformers.serving.openai.server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = start_worker(os.environ)
    logging.getLogger("worker_transformers").info(
        "OpenAI-compatible API at http://%s:%d/openai/v1 (and /v1)", args.host, args.port
    )
    try:
        uvicorn.run(make_app(started.handler), host=args.host, port=args.port, log_level="info")
    finally:
        started.close()


if __name__ == "__main__":
    main()
