"""A local OpenAI-compatible server, for developing against the worker with any OpenAI client:
`python -m worker_transformers.openai_server [--host 127.0.0.1] [--port 8000]` (`make openai-server`).

The worker's real startup, then its real handler behind the HTTP app of serving/openai/server.py, so a client
sees here what it sees from the endpoint.
"""

from __future__ import annotations

import argparse
import logging
import os

from worker_transformers.serving.openai.server import make_app
from worker_transformers.worker import start_worker


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m worker_transformers.openai_server", description=__doc__)
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
