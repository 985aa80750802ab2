"""What generation refuses a request with, or fails it with: one home below the job formats, which show these
to the caller in their own shapes (a plain `{"error": ...}`, an OpenAI error object)."""

from __future__ import annotations


class RequestError(ValueError):
    """A job the worker refuses because of what the caller sent. The message reads `<field>: <reason>`."""


class GenerationFailed(RuntimeError):
    """The model failed while generating (not the caller's fault); the cause is chained and was logged."""


class OutOfMemory(GenerationFailed):
    """The device ran out of memory for this request; its memory has been released. `event` names the
    out-of-memory event, which may have failed other requests too."""

    def __init__(self, shed: bool, event: int | None) -> None:
        super().__init__()
        self.shed, self.event = shed, event

    def __str__(self) -> str:
        what = (
            "the request, the newest in its batch, was dropped so the others could go on"
            if self.shed
            else "the request was dropped and its memory freed"
        )
        return (
            f"out of memory on the device while generating; {what}: retry it, and if it recurs lower "
            "MAX_CONCURRENCY, MAX_NEW_TOKENS or MAX_INPUT_TOKENS, or use a larger GPU"
        )


class DeviceFailed(GenerationFailed):
    """The device itself failed (a CUDA error such as a device-side assert): every later call fails too, so the
    worker asks to be replaced."""

