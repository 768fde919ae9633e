"""The word-level tokenizer of the tiny backbones.

Tiny models are trained from scratch, so a BPE vocabulary of 32k+ entries would only slow them down.
This tokenizer splits text into words, whole numbers and punctuation (spaces kept as a `▁` prefix so
decoding restores the text exactly) over a vocabulary read off generated grid-world text. It is a
`PreTrainedTokenizerFast`, saved next to the model and loaded back by `AutoTokenizer.from_pretrained`
like any real checkpoint's tokenizer. Real backbones use their own tokenizers.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
IMAGE = "<image>"
LATENT, START_LATENT, END_LATENT = "<|latent|>", "<|start-latent|>", "<|end-latent|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE, LATENT, START_LATENT, END_LATENT]
_SPLIT = Regex(r"▁?[A-Za-z]+|▁?\d+|▁?[^▁A-Za-z\d]")
NUMBERS = [str(i) for i in range(100)]
"""Always in the vocabulary: a number is one token, so a cell number (e.g. `7`) is one token to match."""


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
            pre_tokenizers.Split(_SPLIT, behavior="isolated"),
        ]
    )


def build_word_tokenizer(texts: Iterable[str], extra_special: Iterable[str] = (),
                         named: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every piece of `texts` (plus numbers 0–99 and letters).
    `named`: special tokens also reachable as attributes (`tokenizer.context_image_token`, `…_id`),
    as a processor reads them (saved in tokenizer_config.json's `extra_special_tokens`)."""
    pre = _pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
    specials = list(dict.fromkeys([*SPECIAL_TOKENS, *extra_special, *(named or {}).values()]))
    base = NUMBERS + [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.,:;?!()-'\n"]
    words = specials + sorted(set(base) | {"▁" + c for c in base if c != "\n"} | set(counts))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=[t for t in specials if t not in (PAD, UNK, BOS, EOS)],
    )
    if named:  # the attribute map replaces the list above: the specials are added back as tokens
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                       eos_token=EOS, extra_special_tokens=dict(named))
        fast.add_tokens([t for t in specials if t not in (PAD, UNK, BOS, EOS)], special_tokens=True)
    return fast
