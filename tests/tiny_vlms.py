"""Tiny random vision-language checkpoints, each a real model folder as the Hub would ship it.

`make_tiny_vlm(family, folder)` writes config.json, model.safetensors, the tokenizer's files, the processor's files
(preprocessor_config.json, processor_config.json) and chat_template.jinja, in a second or two. The image processors
are configured so that an image becomes a handful to a few dozen tokens, and the vision towers match them. Everything
runs on transformers' PIL image processors (no torchvision needed).

`reference(folder, messages)` is transformers' own answer: processor.apply_chat_template -> model.generate, greedy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

from tests.tiny_tokenizers import byte_level_tokenizer, metaspace_tokenizer

# Every family this module can build; FAMILIES (below) is those buildable here.
ALL_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "llava", "gemma4", "qwen3_5", "mistral3", "llama4")
# Families whose processor transformers 5.23 offers only with torchvision (PixtralProcessor is
# @requires("torchvision"); Llama 4's image processor has no PIL version).
NEEDS_TORCHVISION = frozenset({"mistral3", "llama4"})

# Scaled-up random weights: with the default 0.02 every answer of a tiny random model tends to be the same token.
INIT = 0.2


def _parts(image: str) -> str:
    """Jinja that renders one message's content: a string as is, a list part by part (image parts as `image`)."""
    return (
        "{% if message.content is string %}{{ message.content }}"
        "{% else %}{% for part in message.content %}"
        "{% if part.type == 'image' %}{{ " + repr(image) + " }}"
        "{% elif part.type == 'text' %}{{ part.text }}{% endif %}"
        "{% endfor %}{% endif %}"
    )


NL = "{{ '\\n' }}"
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}" + NL
    + _parts("<|vision_start|><|image_pad|><|vision_end|>")
    + "<|im_end|>" + NL + "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant" + NL + "{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message.role == 'assistant' else message.role }}" + NL
    + _parts("<start_of_image>")
    + "<end_of_turn>" + NL + "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model" + NL + "{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message.role | upper }}{{ ': ' }}"
    + _parts("<image>\n")
    + NL + "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|turn>{{ 'model' if message.role == 'assistant' else message.role }}" + NL
    + _parts("<|image|>")
    + "<turn|>" + NL + "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model" + NL + "{% endif %}"
)
MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'assistant' %}" + _parts("[IMG]") + "{{ eos_token }}"
    "{% else %}[INST]" + _parts("[IMG]") + "[/INST]{% endif %}{% endfor %}"
)
LLAMA4_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|header_start|>{{ message.role }}<|header_end|>" + NL + NL
    + _parts("<|image|>")
    + "<|eot|>{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>" + NL + NL
    + "{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message.role | capitalize }}:"
    + _parts("<image>")
    + "<end_of_utterance>" + NL + "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class _Spec:
    tokenizer: Any
    image_processor: Any
    processor_cls: type
    config: Any
    model_cls: type
    chat_template: str
    processor_kwargs: dict = field(default_factory=dict)
    # Run on the random model before it is saved (weight scaling so that answers depend on the image).
    tweak: Callable[[Any], None] | None = None


def _tokenizer(base: Callable, specials: list[str], named: dict[str, str] | None = None, eos: str | None = None):
    """A trained tokenizer plus the family's special tokens (named ones become attributes, e.g. tok.image_token)."""
    from transformers import PreTrainedTokenizerFast

    trained = base()
    backend = trained.backend_tokenizer
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    kwargs = dict(
        bos_token=trained.bos_token,
        eos_token=eos or trained.eos_token,
        unk_token=trained.unk_token,
        pad_token=trained.pad_token,
    )
    if named:
        kwargs["extra_special_tokens"] = named
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _ids(tok, *tokens: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(list(tokens))
    assert tok.unk_token_id not in ids, (tokens, ids)
    return ids


def _llama_text(tok, **extra) -> dict:
    return dict(
        model_type="llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=INIT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


_QWEN_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN_PATCH, _QWEN_MERGE = 8, 2


def _qwen(config_cls, model_cls, processor_cls, text: dict, vision: dict, normalize: bool) -> _Spec:
    """A Qwen vision-language family (2.5-VL, 3-VL, 3.5): what they share (their vision tokens, the image processor,
    the sizes of both towers), with the family's own text and vision settings on top."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(byte_level_tokenizer, _QWEN_SPECIALS)
    start, end, image, video = _ids(tok, *_QWEN_SPECIALS)
    unit = _QWEN_PATCH * _QWEN_MERGE  # one image token per unit x unit pixels
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * unit * unit, "longest_edge": 16 * unit * unit},
        patch_size=_QWEN_PATCH,
        temporal_patch_size=2,
        merge_size=_QWEN_MERGE,
        **({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]} if normalize else {}),
    )
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = config_cls(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            initializer_range=INIT,
            **ids,
            **text,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=_QWEN_PATCH,
            spatial_merge_size=_QWEN_MERGE,
            temporal_patch_size=2,
            out_hidden_size=32,
            initializer_range=INIT,
            **vision,
        ),
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
        initializer_range=INIT,
        **ids,
    )
    return _Spec(tok, image_processor, processor_cls, config, model_cls, QWEN_TEMPLATE)


def _qwen2_5_vl() -> _Spec:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    text = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    vision = {"window_size": 2 * _QWEN_PATCH * _QWEN_MERGE, "fullatt_block_indexes": [1]}
    return _qwen(
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, text, vision, normalize=False
    )


def _qwen3_vl() -> _Spec:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = {"head_dim": 16, "rope_parameters": rope}
    vision = {"num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    return _qwen(Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, text, vision, normalize=True)


def _qwen3_5() -> _Spec:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor

    text = dict(
        # Qwen 3.5's hybrid: Gated DeltaNet (linear attention, a recurrent state) then gated full attention.
        layer_types=["linear_attention", "full_attention"],
        head_dim=32,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        # A quarter of the head rotates (8 dims, 4 frequencies), interleaved T/H/W as in the real checkpoints.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )
    vision = {"num_position_embeddings": 64}
    return _qwen(Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor, text, vision, normalize=True)


def _gemma3() -> _Spec:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    specials = [*named.values(), "<start_of_turn>", "<end_of_turn>"]
    tok = _tokenizer(metaspace_tokenizer, specials, named, eos="<end_of_turn>")
    image, boi, eoi = _ids(tok, *named.values())
    image_size, patch, tokens_per_image = 32, 4, 16  # 8x8 patches pooled to 4x4 = 16 image tokens
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, do_pan_and_scan=False)
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=1024,
            initializer_range=INIT,
            bos_token_id=tok.bos_token_id,
            eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("</s>")],
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
        ),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image,
        initializer_range=INIT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("</s>")],
        pad_token_id=tok.pad_token_id,
    )
    return _Spec(
        tok,
        image_processor,
        Gemma3Processor,
        config,
        Gemma3ForConditionalGeneration,
        GEMMA_TEMPLATE,
        {"image_seq_length": tokens_per_image},
    )


def _llava() -> _Spec:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(metaspace_tokenizer, ["<image>"])
    (image,) = _ids(tok, "<image>")
    image_size, patch = 16, 4  # 4x4 = 16 patches (+ CLS, dropped by the "default" feature strategy)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    config = LlavaConfig(
        text_config=_llama_text(tok),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
        ),
        image_token_index=image,
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        initializer_range=INIT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kwargs = {"patch_size": patch, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    return _Spec(tok, image_processor, LlavaProcessor, config, LlavaForConditionalGeneration, LLAVA_TEMPLATE, kwargs)


def _idefics3() -> _Spec:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    rows_cols = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows_cols]
    tok = _tokenizer(byte_level_tokenizer, specials, eos="<end_of_utterance>")
    (image,) = _ids(tok, "<image>")
    tile, patch, scale = 32, 8, 2  # a 32x32 tile is 4x4 patches, pixel-shuffled to 2x2 = 4 image tokens
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    config = Idefics3Config(
        text_config=_llama_text(tok),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=tile,
            patch_size=patch,
            initializer_range=INIT,
        ),
        scale_factor=scale,
        image_token_id=image,
        initializer_range=INIT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kwargs = {"image_seq_len": (tile // patch) ** 2 // scale**2}
    return _Spec(
        tok, image_processor, Idefics3Processor, config, Idefics3ForConditionalGeneration, IDEFICS3_TEMPLATE, kwargs
    )


def _gemma4() -> _Spec:
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    # The audio tokens too: Gemma4Processor.validate_inputs refuses any input when boa/eoa tokens are missing.
    named = {
        "image_token": "<|image|>",
        "boi_token": "<|image>",
        "eoi_token": "<image|>",
        "audio_token": "<|audio|>",
        "boa_token": "<|audio>",
        "eoa_token": "<audio|>",
    }
    specials = [*named.values(), "<|video|>", "<|turn>", "<turn|>"]
    tok = _tokenizer(metaspace_tokenizer, specials, named, eos="<turn|>")
    image, boi, eoi, audio, boa, eoa, video = _ids(tok, *named.values(), "<|video|>")
    # Gemma 4 answers one token over and over from 0.2 up; at 0.05 text answers vary, and a patch embedding scaled
    # by 5 makes them depend on the image (else the position embeddings drown the pixels).
    init = 0.05
    patch, pool, soft_tokens = 4, 3, 70  # 70 is the smallest budget Gemma 4's image processor accepts
    image_processor = Gemma4ImageProcessorPil(patch_size=patch, pooling_kernel_size=pool, max_soft_tokens=soft_tokens)
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("</s>")]
    config = Gemma4Config(
        text_config=dict(
            vocab_size=len(tok),
            vocab_size_per_layer_input=len(tok),
            hidden_size=32,
            hidden_size_per_layer_input=8,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            global_head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=1024,
            initializer_range=init,
            bos_token_id=tok.bos_token_id,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=patch,
            pooling_kernel_size=pool,
            position_embedding_size=64,
            initializer_range=init,
        ),
        audio_config=None,
        boi_token_id=boi,
        eoi_token_id=eoi,
        image_token_id=image,
        video_token_id=video,
        audio_token_id=audio,
        boa_token_id=boa,
        eoa_token_index=eoa,
        initializer_range=init,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
    )
    return _Spec(
        tok,
        image_processor,
        Gemma4Processor,
        config,
        Gemma4ForConditionalGeneration,
        GEMMA4_TEMPLATE,
        {"feature_extractor": Gemma4AudioFeatureExtractor(), "image_seq_length": soft_tokens},
        tweak=lambda model: model.model.vision_tower.patch_embedder.input_proj.weight.data.mul_(5.0),
    )


def _mistral3() -> _Spec:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    specials = ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = _tokenizer(metaspace_tokenizer, specials)
    (image,) = _ids(tok, "[IMG]")
    # Pixtral resizes to whole (patch x merge) blocks, longest edge at most 32: up to 4x4 image tokens, each row
    # ended by [IMG_BREAK] (the last by [IMG_END]).
    patch, merge, longest = 4, 2, 32
    image_processor = PixtralImageProcessorPil(size={"longest_edge": longest}, patch_size=patch * merge)
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=None,
            max_position_embeddings=1024,
            initializer_range=INIT,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=16,
            image_size=longest,
            patch_size=patch,
            initializer_range=INIT,
        ),
        image_token_index=image,
        spatial_merge_size=merge,
        vision_feature_layer=-1,
        initializer_range=INIT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kwargs = {"patch_size": patch, "spatial_merge_size": merge}
    return _Spec(
        tok, image_processor, PixtralProcessor, config, Mistral3ForConditionalGeneration, MISTRAL3_TEMPLATE, kwargs
    )


def _llama4() -> _Spec:
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4Processor
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

    images = ["<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>"]
    specials = ["<|header_start|>", "<|header_end|>", "<|eot|>", *images, "<|tile_y_separator|>"]
    tok = _tokenizer(metaspace_tokenizer, specials, eos="<|eot|>")
    boi, eoi, patch_token = _ids(tok, "<|image_start|>", "<|image_end|>", "<|patch|>")
    # 16x16 tiles (at most 4, plus a global tile when there are several), each 4x4 patches pixel-shuffled to 2x2 =
    # 4 <|patch|> tokens. Llama 4's image processor exists only for torchvision.
    tile, patch, shuffle = 16, 4, 0.5
    # Llama 4's processor rescales and normalizes in bfloat16 (as Meta's code did), pixels that a float32 model
    # refuses (transformers' own generate fails: "expected m1 and m2 to have the same dtype"); rescaled alone they
    # stay float32, here to [0, 2] where the Hub's processor gives [-1, 1].
    image_processor = Llama4ImageProcessor(
        size={"height": tile, "width": tile}, max_patches=4, do_normalize=False, rescale_factor=1 / 127.5
    )
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("</s>")]
    config = Llama4Config(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            intermediate_size_mlp=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            # Layer 0: RoPE and chunked attention, a mixture of experts; layer 1: no RoPE, full attention, dense.
            no_rope_layers=[1, 0],
            num_local_experts=2,
            num_experts_per_tok=1,
            moe_layers=[0],
            attention_chunk_size=8192,
            max_position_embeddings=1024,
            initializer_range=INIT,
            bos_token_id=tok.bos_token_id,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=128,  # 4 x hidden: the pixel shuffle's output width
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=tile,
            patch_size=patch,
            pixel_shuffle_ratio=shuffle,
            projector_input_dim=32,
            projector_output_dim=32,
            vision_output_dim=32,
            initializer_range=INIT,
        ),
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=patch_token,
        initializer_range=INIT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
    )
    kwargs = {"patch_size": patch, "pixel_shuffle_ratio": shuffle}
    return _Spec(tok, image_processor, Llama4Processor, config, Llama4ForConditionalGeneration, LLAMA4_TEMPLATE, kwargs)


_BUILDERS: dict[str, Callable[[], _Spec]] = {
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "gemma3": _gemma3,
    "idefics3": _idefics3,
    "llava": _llava,
    "gemma4": _gemma4,
    "qwen3_5": _qwen3_5,
    "mistral3": _mistral3,
    "llama4": _llama4,
}
assert set(_BUILDERS) == set(ALL_FAMILIES)


def _needs_video_processor(processor_cls: type) -> bool:
    return "video_processor" in processor_cls.get_attributes()


def _without_video(processor_cls: type) -> type:
    """`processor_cls` (Qwen2.5-VL, Qwen3-VL, Gemma 4) less its video processor. Without torchvision transformers
    5.23 can neither build nor load these processors: every video processor needs torchvision, and ProcessorMixin
    checks the `video_processor` argument against VideoProcessorMixin, a torchvision dummy, even when it is None. The
    subclass has the same name and otherwise the same code, so it saves the same files and processes images and text
    the same way."""
    import inspect

    from transformers import ProcessorMixin

    class _DropVideo(ProcessorMixin):
        def __init__(self, *args, video_processor=None, **kwargs):
            # A positional trailing None (Qwen) is dropped too: ProcessorMixin pairs args with get_attributes().
            ProcessorMixin.__init__(self, *args, **kwargs)

    # transformers reads the sub-processors from the signature and the accepted arguments from __code__: a real
    # function with the original's parameters less video_processor.
    params = [
        p
        for p in inspect.signature(processor_cls.__init__).parameters.values()
        if p.name not in ("self", "video_processor") and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    head = ", ".join(f"{p.name}=_defaults[{p.name!r}]" if p.name in defaults else p.name for p in params)
    call = ", ".join(f"{p.name}={p.name}" for p in params)
    source = (
        f"def __init__(self, {head}, **kwargs):\n"
        f"    _cls.__init__(self, {call}, video_processor=None, **kwargs)\n"
    )
    scope = {"_cls": processor_cls, "_defaults": defaults}
    exec(source, scope)
    __init__ = scope["__init__"]

    return type(
        processor_cls.__name__,
        (processor_cls, _DropVideo),
        {"__init__": __init__, "__module__": processor_cls.__module__, "__qualname__": processor_cls.__qualname__},
    )


def _torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def _video_processor(model_type: str, image_processor):
    """The family's (torchvision-only) video processor, its patch settings those of `image_processor`."""
    import transformers
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    cls = getattr(transformers, VIDEO_PROCESSOR_MAPPING_NAMES[model_type]["torchvision"])
    shared = ("patch_size", "temporal_patch_size", "merge_size", "pooling_kernel_size", "image_mean", "image_std")
    valid = cls.valid_kwargs.__annotations__
    return cls(**{k: getattr(image_processor, k) for k in shared if k in valid and hasattr(image_processor, k)})


def build_processor(processor_cls: type, model_type: str, **parts):
    """`processor_cls` made of `parts` (its image processor, tokenizer, chat template, ...), with the video processor
    it insists on where torchvision is installed, and without one (`_without_video`) where it is not."""
    if _needs_video_processor(processor_cls):
        if _torchvision():
            parts["video_processor"] = _video_processor(model_type, parts["image_processor"])
        else:
            processor_cls = _without_video(processor_cls)
    return processor_cls(**parts)


def available(family: str) -> bool:
    """Whether `family` can be built and run in this environment (the torchvision-only ones need torchvision)."""
    if family not in _BUILDERS:
        raise KeyError(f"unknown family {family!r}; known: {ALL_FAMILIES}")
    return family not in NEEDS_TORCHVISION or _torchvision()


# The families buildable here, in ALL_FAMILIES' order.
FAMILIES = tuple(family for family in ALL_FAMILIES if available(family))


def make_tiny_vlm(family: str, folder: Path) -> Path:
    """Write a tiny random `family` vision-language model to `folder` (safetensors weights, float32)."""
    import torch

    if not available(family):
        raise RuntimeError(f"{family} needs torchvision, which is not installed here")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = _BUILDERS[family]()
    spec.tokenizer.chat_template = spec.chat_template
    processor = build_processor(
        spec.processor_cls,
        spec.config.model_type,
        image_processor=spec.image_processor,
        tokenizer=spec.tokenizer,
        chat_template=spec.chat_template,
        **spec.processor_kwargs,
    )
    torch.manual_seed(0)
    model = spec.model_cls(spec.config).eval()
    if model.dtype != torch.float32:  # (not unconditionally: .to casts Llama 4's complex RoPE buffer to real)
        model = model.to(torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            # Some weights start at zero (Gemma 3's mm_input_projection_weight): images would all look the same.
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, INIT)
        if spec.tweak is not None:
            spec.tweak(model)
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    # transformers 5 nests the image processor's settings in processor_config.json; most Hub repos (saved by
    # transformers 4) ship them as preprocessor_config.json, which transformers 5 still reads. Write both.
    spec.image_processor.save_pretrained(folder)
    return folder


def load(folder: Path):
    """transformers' own processor and model for `folder` (float32, eval)."""
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = json.loads((Path(folder) / "processor_config.json").read_text())
    processor_cls = getattr(transformers, config["processor_class"])
    if _needs_video_processor(processor_cls) and not _torchvision():
        processor = _without_video(processor_cls).from_pretrained(folder)
    else:
        processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return processor, model


def reference(folder: Path, messages: list[dict], max_new_tokens: int = 8, *, loaded=None) -> list[int]:
    """transformers' own greedy answer to `messages`: the new token ids."""
    import torch

    processor, model = loaded or load(folder)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def sample_images() -> list:
    """A few small distinct RGB images: a 40x30 gradient, a 64x64 checkerboard, 50x70 seeded noise."""
    import numpy as np
    from PIL import Image

    x = np.linspace(0, 255, 40, dtype=np.uint8)
    gradient = np.stack([np.tile(x, (30, 1)), np.tile(x[::-1], (30, 1)), np.full((30, 40), 128, np.uint8)], -1)
    squares = ((np.indices((64, 64)) // 8).sum(0) % 2 * 255).astype(np.uint8)
    checker = np.stack([squares, 255 - squares, squares], -1)
    noise = np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    return [Image.fromarray(a, "RGB") for a in (gradient, checker, noise)]


def image_message(image, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
