"""Generation: a validated request in, text with its finish reason and token counts out.

The engine owns the model and tokenizer once they are loaded. `generate` blocks (it runs the forward
passes), so the async handler calls it from a worker thread; a lock keeps one generation at a time on the
device, and with it the global RNG that a request's seed sets.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .schema import GenerationRequest, RequestError


class Engine:
    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_name: str, max_input_tokens: int
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_input_tokens = max_input_tokens
        self._base_config = model.generation_config
        self._lock = threading.Lock()

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids of the request's input: the chat template applied to messages, or the prompt as is."""
        if request.messages is not None:
            if not self.tokenizer.chat_template:
                raise RequestError("messages: this model has no chat template; send prompt instead")
            text = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in request.messages], add_generation_prompt=True, tokenize=False
            )
            # The template already holds the special tokens (BOS, turn markers); do not add them twice.
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
        if len(ids) > self.max_input_tokens:
            field = "messages" if request.messages is not None else "prompt"
            raise RequestError(
                f"{field}: {len(ids)} tokens is more than MAX_INPUT_TOKENS={self.max_input_tokens}; send less"
            )
        return ids

    def generation_config(self, request: GenerationRequest) -> GenerationConfig:
        # Start from the model's own config (its EOS tokens) and override every sampling knob, so the
        # checkpoint's suggested temperature never silently replaces what the caller asked for.
        config = copy.deepcopy(self._base_config)
        config.max_new_tokens = request.max_new_tokens
        config.do_sample = not request.greedy
        config.temperature = request.temperature if not request.greedy else 1.0
        config.top_p = request.top_p
        config.top_k = request.top_k if request.top_k > 0 else None
        config.repetition_penalty = request.repetition_penalty
        config.stop_strings = request.stop or None
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        return config

    def generate(self, request: GenerationRequest) -> dict[str, Any]:
        ids = self.prompt_ids(request)
        config = self.generation_config(request)
        input_ids = torch.tensor([ids], device=self.model.device)
        with self._lock, torch.inference_mode():
            if request.seed is not None:
                torch.manual_seed(request.seed)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                tokenizer=self.tokenizer,
            )
        new_ids = output[0, len(ids) :].tolist()
        text, finish_reason = self.finish(new_ids, request)
        return self.response(text, finish_reason, len(ids), len(new_ids))

    def finish(self, new_ids: list[int], request: GenerationRequest) -> tuple[str, str]:
        """The text to return, cut before the first stop string, and why generation ended."""
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], "stop"
        if new_ids and new_ids[-1] in self._eos_ids():
            return text, "stop"
        return text, "length" if len(new_ids) >= request.max_new_tokens else "stop"

    def _eos_ids(self) -> set[int]:
        eos = self._base_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos}

    def response(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "text": text,
            "finish_reason": finish_reason,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "model": self.model_name,
        }
