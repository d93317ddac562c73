"""The fine-tuning task: arithmetic word problems (a small GSM8K), far from the base model's Python text.

Problems come from templates with a fixed seed; the held-out split has its own seed and shares no question with
the training split.  The loss is on the answer tokens only (the prompt is masked, as in supervised fine-tuning).
Exact match is scored with one teacher-forced forward pass: an answer counts when the argmax at every answer
position (the digits and the closing newline) is the answer's token -- which is exactly when greedy decoding
from the prompt would produce the answer's tokens and stop.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lena", "Milo", "Nora"]
ITEMS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells", "cookies", "stones"]


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    @property
    def target(self) -> str:
        return f" {self.answer}\n"


def make_problem(rng: random.Random) -> Problem:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 39)
        return Problem(f"{name} has {a} {item}. {name} gets {b} more from {other}. "
                       f"How many {item} does {name} have now?", a + b)
    if kind == 1:
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
        return Problem(f"{name} had {a} {item} and gave {b} of them to {other}. "
                       f"How many {item} does {name} have left?", a - b)
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        return Problem(f"Each box holds {a} {item}. {name} buys {b} boxes. "
                       f"How many {item} does {name} have?", a * b)
    q, b = rng.randint(2, 12), rng.randint(2, 9)
    return Problem(f"{name} shares {q * b} {item} equally among {b} friends. "
                   f"How many {item} does each friend get?", q)


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> Tuple[List[Problem], List[Problem]]:
    """(train, held-out): deterministic in ``seed``; no held-out question appears in the training split."""
    rng = random.Random(f"train-{seed}")
    train = [make_problem(rng) for _ in range(n_train)]
    seen = {p.question for p in train}
    rng = random.Random(f"eval-{seed}")
    held: List[Problem] = []
    while len(held) < n_eval:
        p = make_problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            held.append(p)
    return train, held


def encode(tok, problems: Sequence[Problem]) -> List[Tuple[List[int], int]]:
    """Token ids of prompt + answer, and the prompt's length (prompt and answer tokenised separately)."""
    prompts = tok.encode_batch([p.prompt for p in problems])
    targets = tok.encode_batch([p.target for p in problems])
    return [(a.ids + b.ids, len(a.ids)) for a, b in zip(prompts, targets)]


def collate(examples: Sequence[Tuple[List[int], int]], pad_id: int, device=None):
    """Right-padded input_ids / attention_mask / labels (-100 on prompt and padding)."""
    n = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), n), dtype=torch.long)
    lab = torch.full((len(examples), n), -100, dtype=torch.long)
    for i, (ids, plen) in enumerate(examples):
        x[i, :len(ids)] = torch.tensor(ids)
        att[i, :len(ids)] = 1
        lab[i, plen:len(ids)] = torch.tensor(ids[plen:])
    return {k: v.to(device) for k, v in (("input_ids", x), ("attention_mask", att), ("labels", lab))}


def answer_scores(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: exact match (bool), summed answer-token cross-entropy, answer-token count."""
    pred = logits[:, :-1].argmax(-1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    ok = ((pred == tgt) | ~mask).all(dim=1) & mask.any(dim=1)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt.clamp_min(0),
                                           reduction="none")
    return ok, (ce * mask).sum(1), mask.sum(1)


@torch.no_grad()
def evaluate(model, batches) -> Tuple[float, float]:
    """(answer-token mean cross-entropy, exact-match rate) over prepared batches, at the model's current weights."""
    was = model.training
    model.eval()
    hits = n = 0
    ce_sum = 0.0
    tokens = 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ok, ce, cnt = answer_scores(logits, b["labels"])
        hits += int(ok.sum())
        n += ok.numel()
        ce_sum += float(ce.sum())
        tokens += int(cnt.sum())
    model.train(was)
    return ce_sum / max(1, tokens), hits / max(1, n)
