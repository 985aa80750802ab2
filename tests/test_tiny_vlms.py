"""The tiny vision-language checkpoints of tests/tiny_vlms.py: each builds, loads with transformers' own processor
and model, answers images deterministically, tells images apart, and chats without images."""

import json

import pytest

from tests.tiny_vlms import (
    ALL_FAMILIES,
    FAMILIES,
    NEEDS_TORCHVISION,
    available,
    image_message,
    load,
    make_tiny_vlm,
    reference,
    sample_images,
)

PROMPTS = ("What is in the picture?", "Describe it.", "Color?")

# Every family, those that cannot be built here (torchvision-only processors without torchvision) skipped by name.
EVERY = [
    pytest.param(f, marks=pytest.mark.skipif(not available(f), reason=f"{f} needs torchvision")) for f in ALL_FAMILIES
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (folder, (processor, model)), built once for the module."""
    out = {}
    for family in FAMILIES:
        folder = make_tiny_vlm(family, tmp_path_factory.mktemp(family))
        out[family] = folder, load(folder)
    return out


@pytest.fixture(scope="module")
def images():
    return sample_images()


@pytest.mark.parametrize("family", EVERY)
def test_folder_is_a_checkpoint(built, family):
    from transformers import AutoConfig, AutoTokenizer

    folder, (processor, model) = built[family]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert {"chat_template.jinja", "preprocessor_config.json"} <= names
    assert AutoConfig.from_pretrained(folder).model_type == family
    assert AutoTokenizer.from_pretrained(folder).chat_template == processor.chat_template
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == type(processor).__name__
    assert type(model).__name__.endswith("ForConditionalGeneration")
    # Without torchvision transformers runs the PIL image processors (with it, its torchvision ones).
    if not available("llama4"):
        assert processor.image_processor.__class__.__name__.endswith("Pil")


@pytest.mark.parametrize("family", EVERY)
def test_image_answers(built, images, family):
    folder, loaded = built[family]
    first = reference(folder, image_message(images[0], PROMPTS[0]), loaded=loaded)
    assert first and reference(folder, image_message(images[0], PROMPTS[0]), loaded=loaded) == first
    answers = {
        prompt: [reference(folder, image_message(image, prompt), loaded=loaded) for image in images[:2]]
        for prompt in PROMPTS
    }
    assert answers[PROMPTS[0]][0] == first
    assert any(a != b for a, b in answers.values()), answers


@pytest.mark.parametrize("family", EVERY)
def test_text_only_chat(built, family):
    folder, loaded = built[family]
    plain = reference(folder, [{"role": "user", "content": "Hello there"}], loaded=loaded)
    parts = reference(folder, [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}], loaded=loaded)
    assert plain and plain == parts


def test_families_are_those_buildable_here():
    from transformers.utils import is_torchvision_available

    assert set(FAMILIES) <= set(ALL_FAMILIES) and len(set(ALL_FAMILIES)) == len(ALL_FAMILIES)
    assert FAMILIES == tuple(f for f in ALL_FAMILIES if available(f))
    assert set(ALL_FAMILIES) - set(FAMILIES) == (set() if is_torchvision_available() else NEEDS_TORCHVISION)
    with pytest.raises(KeyError):
        available("no_such_family")


@pytest.mark.parametrize("family", sorted(NEEDS_TORCHVISION))
def test_a_family_that_needs_torchvision_is_refused_without_it(tmp_path, family):
    if available(family):
        pytest.skip("torchvision is installed")
    with pytest.raises(RuntimeError, match="torchvision"):
        make_tiny_vlm(family, tmp_path)
