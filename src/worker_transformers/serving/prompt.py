"""A request's input as token ids: the chat template applied to messages, or the prompt as is, and the caps.

The chat template renders in a child process (renderer.py): one that has not answered within
TEMPLATE_TIMEOUT_S is killed and the job fails with a message naming the template. A chat with images (for a
vision-language model) renders a placeholder for each; its images are fetched and decoded (images.py) and go
with the rendered text through the model's processor (processing.py), which expands each placeholder into the
image's tokens: MAX_INPUT_TOKENS counts those.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from worker_transformers.generation.vision import Pixels
from worker_transformers.serving.images import ImageLimits, load_images
from worker_transformers.serving.processing import ImagePrompts
from worker_transformers.serving.renderer import TEMPLATE_TIMEOUT_S, RenderFailed, RenderTimeout, TemplateRenderers
from worker_transformers.serving.schema import GenerationRequest, RequestError

# Tokens average 3-5 characters of text; no real prompt averages 16, so text past 16 per allowed token is
# refused unread.
CHARS_PER_TOKEN_LIMIT = 16


class TemplateTimeout(RequestError):
    """The chat template did not finish rendering in time; its child process was stopped."""


class Prompts:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        max_input_tokens: int,
        renderers: TemplateRenderers | None = None,
        images: ImagePrompts | None = None,
        image_limits: ImageLimits | None = None,
    ) -> None:
        """`renderers`: the pool of template renderers, started early (startup starts its first child before its
        own imports) and given this tokenizer here; without one, a pool of one child is made. `images`: the model's
        processor, for a model that takes images (None: images are refused), within `image_limits`."""
        self.tokenizer = tokenizer
        self.images = images
        self.image_limits = image_limits or ImageLimits()
        self.model_name = model_name
        self.max_input_tokens = max_input_tokens
        self._renderers = renderers or TemplateRenderers(TEMPLATE_TIMEOUT_S, max_children=1)
        if tokenizer.chat_template:
            self._renderers.serve(tokenizer)
        else:  # nothing to render: messages are refused (`render`), and no child is kept for them
            self._renderers.close()

    def inputs(self, request: GenerationRequest) -> tuple[list[int], Pixels | None]:
        """Token ids of the request's input, and its processed images when it has some. Raises RequestError naming
        the field."""
        self._check_size(request)
        pixels = None
        if request.messages is not None:
            urls = request.image_urls()
            if urls and self.images is None:
                raise RequestError(f"{urls[0][1]}: {self.model_name} takes no images; send text only")
            images = load_images(urls, self.image_limits) if urls else []
            text = self.render(request.template_messages(), request.template_tools())
            if images:
                ids, pixels = self._processed(text, images)
            else:
                # The template already holds the special tokens (BOS, turn markers); do not add them twice.
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
        if len(ids) > self.max_input_tokens:
            field = "messages" if request.messages is not None else "prompt"
            raise RequestError(
                f"{field}: {len(ids)} tokens is more than MAX_INPUT_TOKENS={self.max_input_tokens}; send less"
            )
        if not ids:
            raise RequestError("prompt: the text has no tokens")
        return ids, pixels

    def _processed(self, text: str, images: list) -> tuple[list[int], Pixels]:
        try:
            return self.images.inputs(text, images)
        except ValueError as error:  # the processor's refusal: an image it cannot resize, placeholders not matched
            reason = (str(error).splitlines() or [""])[0][:200]
            raise RequestError(f"messages: the model's image processor refused the images ({reason})") from None

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The chat template applied to `messages` (and `tools`, when the request has them), within
        TEMPLATE_TIMEOUT_S."""
        if not self.tokenizer.chat_template:
            raise RequestError("messages: this model has no chat template; send prompt instead")
        try:
            return self._renderers.render(messages, tools)
        except RenderTimeout:
            raise TemplateTimeout(
                f"messages: the chat template of {self.model_name} did not finish rendering them within "
                f"{self._renderers.limit_s:.0f} s and was stopped; the template loops on this input: fix the model's "
                "chat template (chat_template.jinja or tokenizer_config.json), or send prompt instead"
            ) from None
        except RenderFailed as error:  # the template's own refusal (raise_exception), such as roles out of order
            raise RequestError(f"messages: the chat template of {self.model_name} refused them: {error}") from None

    def close(self) -> None:
        self._renderers.close()

    def _check_size(self, request: GenerationRequest) -> None:
        """Refuse text far beyond MAX_INPUT_TOKENS before tokenizing it: tokenizing megabytes costs seconds of
        CPU, only to refuse them afterwards."""
        field = "messages" if request.messages is not None else "prompt"
        size = request.text_size()
        limit = CHARS_PER_TOKEN_LIMIT * self.max_input_tokens
        if size > limit:
            raise RequestError(
                f"{field}: {size} characters is more than {limit} ({CHARS_PER_TOKEN_LIMIT} per token of "
                f"MAX_INPUT_TOKENS={self.max_input_tokens}); send less"
            )
