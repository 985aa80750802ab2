"""Images in generation: a request's processed images, and what batching them needs to know of the model.

A vision-language model's processor turns a prompt's images into pixel values (and what the model reads with
them: Qwen's patch grid, Idefics 3's pixel mask, token type ids) and expands each image's placeholder into the
image tokens whose embeddings the vision tower's features replace. The model's own forward takes all of it, so a
request's prefill carries its `Pixels` into the forward and it then decodes as text, like any other row.

Two things about an image prompt are the model's own and not the batcher's to guess: its rotary positions
(Qwen's multimodal RoPE gives an image's tokens 3D positions, and the text after it continues from a position
that is not its token count: `get_rope_index` says where, and the difference is kept per row for every decode
step) and whether an image's tokens see each other both ways in the prefill (Gemma 3's do; batch/check.py tries
whether the model's logits need it). `image_blocks` gives each image's run of tokens an id for that mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

# The processor's outputs that run alongside the prompt, a value per token: extended by a token like the prompt.
PER_TOKEN = ("token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True, eq=False)
class Pixels:
    """One request's processed images: the processor's tensors other than the prompt's ids and attention mask,
    as the model's forward takes them. Compared by identity: a request's n choices share one and may share a
    prefill; two requests never do, even with the same token ids (image tokens are alike whatever the image)."""

    tensors: dict[str, torch.Tensor]
    images: int

    def arguments(self, takes: set[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors the forward names (`takes`), on `device`."""
        return {name: tensor.to(device) for name, tensor in self.tensors.items() if name in takes}

    def extended(self, tokens: int) -> Pixels:
        """The same images for a prompt `tokens` longer: the per-token tensors grow with zeros (text tokens)."""
        tensors = {
            name: torch.cat([t, t.new_zeros(*t.shape[:-1], tokens)], dim=-1) if name in PER_TOKEN else t
            for name, t in self.tensors.items()
        }
        return Pixels(tensors, self.images)


@dataclass(frozen=True)
class VisionModel:
    """What the batcher needs of a vision-language model: the token ids its processor puts where image features
    go, and its multimodal rotary positions, when it has them."""

    image_token_ids: frozenset[int]
    rope_index: Callable | None  # the model's get_rope_index: (positions (k, 1, tokens), the text's offset)

    @classmethod
    def of(cls, model: PreTrainedModel) -> VisionModel | None:
        """The model's vision facts; None for a model that takes no images."""
        config = model.config
        if getattr(config, "vision_config", None) is None:
            return None
        ids = {getattr(config, name, None) for name in ("image_token_id", "image_token_index")}
        ids |= {getattr(config.get_text_config(), "image_token_id", None)}
        ids.discard(None)
        inner = getattr(model, "model", None)
        return cls(frozenset(ids), getattr(inner, "get_rope_index", None))

    def rotary_positions(self, ids: torch.Tensor, pixels: Pixels) -> tuple[torch.Tensor, int] | None:
        """An image prompt's rotary positions (k, 1, tokens) as the model's own forward computes them, and how
        far the next token's position is from its count of tokens; None where the positions are plain."""
        if self.rope_index is None:
            return None
        wanted = inspect.signature(self.rope_index).parameters
        given = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels.arguments(set(wanted), ids.device)}
        positions, offset = self.rope_index(**{name: value for name, value in given.items() if name in wanted})
        return positions, int(offset.reshape(-1)[0])

    def image_blocks(self, ids: torch.Tensor) -> torch.Tensor:
        """(rows, tokens): for each image token, the number of its image in its row (a run of image tokens, as
        Gemma 3 counts them); -1 for every other token."""
        is_image = torch.isin(ids, torch.tensor(sorted(self.image_token_ids), device=ids.device))
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        return torch.where(is_image, starts.long().cumsum(-1) - 1, -1)
