"""Tokenizers of the two families that decode differently, trained here in a second: byte-level BPE (GPT-2,
Llama 3, Qwen) and SentencePiece-style Metaspace BPE with byte fallback (Llama 2, Mistral, Gemma)."""

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The capital of France is Paris, and the capital of Japan is 東京.",
    "He lived in a small house in the hills, naïve and happy, with a café 🙂 nearby.",
    "Stop here, then go on: one, two, three, four, five, six, seven, eight.",
] * 20
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama 2 / Mistral style tokenizer: BPE over Metaspace pieces, and byte fallback (<0xE5> ... as ordinary
    tokens) for any character it has not seen."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False)
    )
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    bpe = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    bpe.add_special_tokens(SPECIALS)
    bpe.pre_tokenizer = trained.pre_tokenizer
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style tokenizer: BPE over bytes, so every character has tokens."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<|im_end|>"
    )
