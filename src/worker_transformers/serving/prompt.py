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
from worker_transformers.serving.schema import GenerationRequest, RequestError, field_name

# Tokens average 3-5 characters of text; no real prompt averages 16, so text past 16 per allowed token is
# refused unread.
CHARS_PER_TOKEN_LIMIT = 16


# What the worker and transformers pass the chat template themselves: a request cannot set these.
RESERVED_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize", "chat_template"}
)
# The tokenizer's special tokens, which transformers passes every template; not worth listing as its variables.
SPECIAL_TOKEN_VARIABLES = frozenset(
    {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token", "raise_exception"}
)


def template_variables(tokenizer: PreTrainedTokenizerBase) -> frozenset[str]:
    """The variables the tokenizer's chat template reads without setting them (`enable_thinking`,
    `reasoning_effort`, `messages`, ...): what a request may pass it. Every named template counts (a tokenizer may
    keep several: `default`, `tool_use`)."""
    from jinja2 import meta
    from jinja2.exceptions import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    templates = tokenizer.chat_template
    sources = list(templates.values()) if isinstance(templates, dict) else [templates] if templates else []
    names: set[str] = set()
    for source in sources:
        try:
            environment = _compile_jinja_template(source).environment
            names |= meta.find_undeclared_variables(environment.parse(source))
        except TemplateSyntaxError:  # a broken template fails where it is rendered, with its own message
            continue
    return frozenset(names)


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
        self.template_variables = template_variables(tokenizer)
        if tokenizer.chat_template:
            self._renderers.serve(tokenizer)
        else:  # nothing to render: messages are refused (`render`), and no child is kept for them
            self._renderers.close()

    def inputs(self, request: GenerationRequest) -> tuple[list[int], Pixels | None, str | None]:
        """Token ids of the request's input, its processed images when it has some, and the chat as the template
        wrote it (None for a prompt). Raises RequestError naming the field."""
        self._check_size(request)
        pixels, text = None, None
        if request.messages is not None:
            urls = request.image_urls()
            if urls and self.images is None:
                raise RequestError(f"{urls[0][1]}: {self.model_name} takes no images; send text only")
            images = load_images(urls, self.image_limits) if urls else []
            variables = self._checked_variables(request)
            text = self.render(request.template_messages(), request.template_tools(), variables)
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
        return ids, pixels, text

    def _processed(self, text: str, images: list) -> tuple[list[int], Pixels]:
        try:
            return self.images.inputs(text, images)
        except ValueError as error:  # the processor's refusal: an image it cannot resize, placeholders not matched
            reason = (str(error).splitlines() or [""])[0][:200]
            raise RequestError(f"messages: the model's image processor refused the images ({reason})") from None

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        variables: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The chat template applied to `messages` (and `tools`, and its own `variables`, when the request has
        them), within TEMPLATE_TIMEOUT_S; with the generation prompt unless told otherwise."""
        if not self.tokenizer.chat_template:
            raise RequestError("messages: this model has no chat template; send prompt instead")
        try:
            return self._renderers.render(messages, tools, variables, add_generation_prompt)
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

    def _checked_variables(self, request: GenerationRequest) -> dict[str, Any]:
        """The request's variables for the chat template (`chat_template_kwargs`, `reasoning_effort`), each one the
        template reads: one it does not would change nothing, silently."""
        variables = request.template_variables()
        for name in variables:
            field = "reasoning_effort" if name == "reasoning_effort" and request.reasoning_effort else None
            field = field or f"chat_template_kwargs.{field_name(name)}"
            if name in RESERVED_VARIABLES:
                raise RequestError(f"{field}: the worker sets {name!r} itself; leave it out")
            if name not in self.template_variables:
                known = sorted(self.template_variables - RESERVED_VARIABLES - SPECIAL_TOKEN_VARIABLES)
                reads = f"it reads {', '.join(known)}" if known else "it reads no variables of its own"
                raise RequestError(
                    f"{field}: the chat template of {self.model_name} does not read {name!r} ({reads}); leave it out"
                )
        return variables

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
