"""An image request's prompt through the model's own processor: the rendered chat and its images in, the token
ids (each image's placeholder expanded into its image tokens) and the processed images (generation/vision.py) out.

The processor is transformers' own for the checkpoint (loading/loader.py), so an image request is prepared exactly
as `processor.apply_chat_template(..., tokenize=True)` prepares it, special tokens included: they are added unless
the rendered chat starts with the tokenizer's BOS, as transformers decides it.
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from transformers.processing_utils import ProcessorMixin

from worker_transformers.generation.vision import Pixels

# The processor's outputs that are not the images': the prompt itself.
_PROMPT_OUTPUTS = ("input_ids", "attention_mask")
SAMPLE_MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]


class ImagePrompts:
    def __init__(self, processor: ProcessorMixin) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def inputs(self, text: str, images: list[Image.Image]) -> tuple[list[int], Pixels]:
        """The token ids of `text` (a rendered chat holding one placeholder per image) and its processed images."""
        bos = self.tokenizer.bos_token
        options: dict[str, Any] = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
        # As apply_chat_template passes them: the text as it is, its images as a batch of one (a list per prompt);
        # every processor takes that form, and not all take a flat list of a prompt's several images.
        out = self.processor(text=text, images=[images], return_tensors="pt", **options)
        ids = out["input_ids"][0].tolist()
        tensors = {name: value for name, value in out.items() if name not in _PROMPT_OUTPUTS}
        return ids, Pixels(tensors, len(images))

    def sample(self, render) -> tuple[list[int], Pixels]:
        """A one-image chat, rendered by `render` (the chat template, as a job's is), with a small gradient image:
        what startup checks the batcher with (generation/batch/check.py)."""
        gradient = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
        return self.inputs(render(SAMPLE_MESSAGES), [gradient])
