"""What the OpenAI routes (routes.py) and the local server in front of them (server.py) share: the routes served,
the job that carries one, and OpenAI's error object with the code of each failure the worker reports.

RunPod turns `POST https://api.runpod.ai/v2/<endpoint>/openai/v1/...` into a job whose input is
`{"openai_route": ..., "openai_input": ...}`. A refused request fails the job with the error object as JSON text
(the SDK wants error values to be strings); a stream that fails after it began ends with that object as its last
event, then DONE.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from worker_transformers.generation.errors import DeviceFailed, OutOfMemory

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses")
DONE = "data: [DONE]\n\n"  # the last event of every stream

# The error code of each kind of generation failure; any other is `generation_failed`.
FAILURE_CODES = {OutOfMemory: "out_of_memory", DeviceFailed: "device_error"}


def is_openai_job(job_input: Any) -> bool:
    return isinstance(job_input, dict) and "openai_route" in job_input


def error_body(
    message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_result(
    message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, str]:
    """A failed job's result: the OpenAI error object as JSON text (the SDK wants error values to be strings)."""
    return {"error": json.dumps(error_body(message, param, code, kind))}


def model_not_served(asked: str, served: str) -> dict[str, str]:
    """The failed job of a request for a model this worker does not serve."""
    return error_result(f"model: {asked!r} is not served here; use {served!r}", "model", "model_not_found")


def param_of(message: str) -> str:
    """The top-level field a refusal names first: `messages.0.content: ...` names `messages`."""
    return message.split(":", 1)[0].split(".", 1)[0]


def first_param(error: ValidationError) -> str | None:
    """The top-level field of a body's first validation problem."""
    loc = error.errors()[0]["loc"]
    return str(loc[0]) if loc else None


def failure_code(error: BaseException) -> str:
    """The OpenAI error code of a generation failure."""
    return FAILURE_CODES.get(type(error), "generation_failed")
