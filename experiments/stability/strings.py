"""The learnable task of the dose-response presets: string transformations over a 26-letter alphabet.

The base model is pre-trained here (character-level, nothing downloaded) on four single operations on random
lowercase words, each named by a tag before the word:

    C:word=word        copy                 R:word=drow        reverse
    S:word=xpse        shift every letter +1 (z -> a)          D:word=vnqc        shift every letter -1

and LoRA-fine-tuned on an operation it never saw, the composition ``RS`` (reverse, then shift +1):

    RS:word=esxp

The base knows both halves (where to read each output letter from, and how to shift it) but not that two tags
mean both at once: its zero-shot exact match is near 0, and fine-tuning is adaptation, not learning from
scratch.  Exact match is the whole answer (letters and the closing newline), scored like the arithmetic task.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
PAD, EOS = "<pad>", "<eos>"
#: every character a prompt or answer can hold, after the two special tokens (ids 0 and 1)
CHARS = ALPHABET + "CRSDX:=\n"
PRETRAIN_TAGS = ("C", "R", "S", "D")
FINETUNE_TAG = "RS"


def _shift(s: str, k: int) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + k) % 26] for c in s)


_OPS = {"C": lambda s: s, "R": lambda s: s[::-1], "S": lambda s: _shift(s, 1), "D": lambda s: _shift(s, -1)}


def apply_tag(tag: str, word: str) -> str:
    """The answer for ``tag:word=``: the tag's operations applied left to right."""
    for t in tag:
        word = _OPS[t](word)
    return word


@dataclass(frozen=True)
class Example:
    tag: str
    word: str

    @property
    def prompt(self) -> str:
        return f"{self.tag}:{self.word}="

    @property
    def target(self) -> str:
        return apply_tag(self.tag, self.word) + "\n"


class CharTokenizer:
    """One token per character: ``<pad>`` = 0, ``<eos>`` = 1, then :data:`CHARS`."""

    def __init__(self):
        self.vocab: List[str] = [PAD, EOS] + list(CHARS)
        self._id: Dict[str, int] = {c: i for i, c in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def token_to_id(self, tok: str) -> int:
        return self._id[tok]

    def encode(self, text: str) -> List[int]:
        return [self._id[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i > 1)


def random_word(rng: random.Random, min_len: int = 4, max_len: int = 8) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len)))


def pretrain_examples(n: int, seed: int = 0) -> List[Example]:
    rng = random.Random(f"pretrain-{seed}")
    return [Example(rng.choice(PRETRAIN_TAGS), random_word(rng)) for _ in range(n)]


def make_splits(n_train: int, n_eval: int, seed: int = 0, tag: str = FINETUNE_TAG) -> Tuple[List[Example],
                                                                                         List[Example]]:
    """(train, held-out) fine-tuning examples of ``tag``: deterministic in ``seed``; no held-out word is a
    training word."""
    rng = random.Random(f"strings-train-{seed}")
    train = [Example(tag, random_word(rng)) for _ in range(n_train)]
    seen = {e.word for e in train}
    rng = random.Random(f"strings-eval-{seed}")
    held: List[Example] = []
    while len(held) < n_eval:
        e = Example(tag, random_word(rng))
        if e.word not in seen:
            seen.add(e.word)
            held.append(e)
    return train, held


def encode(tok: CharTokenizer, examples: Sequence[Example]) -> List[Tuple[List[int], int]]:
    """Token ids of prompt + answer and the prompt's length (the input of :func:`task.collate`)."""
    out = []
    for e in examples:
        p = tok.encode(e.prompt)
        out.append((p + tok.encode(e.target), len(p)))
    return out
