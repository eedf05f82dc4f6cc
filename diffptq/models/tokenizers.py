"""Word-level tokenizers built locally (no download), in the two styles the real pipelines expect.

`t5` style: lower-cased words, unknown -> <unk>, an end token </s> appended, pad id 0 (as T5).
`clip` style: <|startoftext|> words <|endoftext|>, padded with <|endoftext|> (as SD 1.5's CLIP tokenizer).
Both are `transformers.PreTrainedTokenizerFast`, so `save_pretrained` / `from_pretrained` and the diffusers
pipelines use them unchanged.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

T5_SPECIALS = ("<pad>", "</s>", "<unk>")
CLIP_SPECIALS = ("<|endoftext|>", "<|startoftext|>", "<unk>")


def vocabulary_from_texts(texts: Iterable[str]) -> list[str]:
    """Sorted lower-case word vocabulary (letters, digits and apostrophes) of `texts`."""
    words: set[str] = set()
    for text in texts:
        words.update(re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower()))
    return sorted(words)


def build_word_tokenizer(words: Iterable[str], style: str = "t5", max_length: int = 120) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` in `style` 't5' or 'clip'; `max_length` sets model_max_length."""
    if style not in ("t5", "clip"):
        raise ValueError(f"tokenizer style must be 't5' or 'clip', got {style!r}")
    specials = T5_SPECIALS if style == "t5" else CLIP_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
        )
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token="<unk>",
        model_max_length=max_length,
    )


def everyday_vocabulary() -> list[str]:
    """The words of the everyday captions (models.names.EVERYDAY_CAPTIONS): the vocabulary of the random-weight
    models, so that their pipelines take the everyday prompts."""
    from diffptq.models.names import EVERYDAY_CAPTIONS

    lines = EVERYDAY_CAPTIONS.read_text(encoding="utf-8").splitlines()
    return vocabulary_from_texts(ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
