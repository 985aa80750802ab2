"""Which of transformers' model classes a checkpoint is loaded as: a causal language model, or an image-text-to-text
model (a vision-language model: Gemma 3 and 4, Qwen 2.5-VL, Qwen 3-VL, Idefics 3, LLaVA, ...).

A checkpoint that ships an image processor (preprocessor_config.json or processor_config.json) and whose config
transformers maps to an image-text-to-text class is loaded as one, with its vision tower, so that it takes images.
Otherwise the causal-LM class serves its text; a vision-language config with no causal-LM class (Qwen 2.5-VL) is
still loaded whole and serves text only.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def has_processor(folder: Path) -> bool:
    """Whether the checkpoint ships the processor its images go through."""
    return any((folder / name).is_file() for name in PROCESSOR_FILES)


def takes_images(config: PreTrainedConfig, folder: Path) -> bool:
    return type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING and has_processor(folder)


def auto_class(config: PreTrainedConfig, folder: Path) -> type:
    """The Auto class that loads this checkpoint (its remote code included, when it has some)."""
    if takes_images(config, folder) or (
        type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING
    ):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def model_class(config: PreTrainedConfig, folder: Path) -> type[PreTrainedModel] | None:
    """The class of transformers' own that this checkpoint builds; None when transformers has none for generating
    with it (custom code, or a model that does not generate text)."""
    images = auto_class(config, folder) is AutoModelForImageTextToText
    mapping = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING if images else MODEL_FOR_CAUSAL_LM_MAPPING
    return mapping[type(config)] if type(config) in mapping else None
