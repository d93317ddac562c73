"""The base model's pre-training text and tokenizer: text that ships with Python, so nothing is downloaded.

The Python documentation's text (``pydoc_data.topics``) and the standard library's top-level modules' source,
in a fixed (sorted) order, cut at a byte budget.  The tokenizer is a byte-level BPE trained here with
``tokenizers``; digits are split one per token so that the arithmetic task's numbers are spelled digit by digit.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import List, Tuple

PAD, EOS = "<pad>", "<eos>"


def corpus_texts(max_bytes: int) -> List[str]:
    """Documentation topics first, then stdlib ``*.py`` files in name order, until ``max_bytes`` (UTF-8)."""
    texts: List[str] = []
    try:
        from pydoc_data.topics import topics

        texts += [topics[k] for k in sorted(topics)]
    except Exception:  # a Python built without pydoc_data: the source alone
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.glob("*.py")):
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    out, total = [], 0
    for t in texts:
        n = len(t.encode("utf-8"))
        if total + n > max_bytes:
            rest = max_bytes - total
            if rest > 1000:
                out.append(t.encode("utf-8")[:rest].decode("utf-8", errors="ignore"))
            break
        out.append(t)
        total += n
    return out


def fingerprint(texts: List[str]) -> str:
    """sha256 of the texts, the data half of the base model's cache key (another Python, another key)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def train_tokenizer(texts: List[str], vocab_size: int):
    """Byte-level BPE with ``<pad>`` = 0 and ``<eos>`` = 1, single-digit number tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def special_ids(tok) -> Tuple[int, int]:
    return tok.token_to_id(PAD), tok.token_to_id(EOS)
