"""The LoRA tensors of LLaMA-2-7B with adapters on every linear layer: the shapes every optimizer-step benchmark
runs on, so that their figures describe the same workload.

q/k/v/o are 4096x4096, gate/up 4096->11008, down 11008->4096; 32 decoder layers; A is r x in, B is out x r:
448 tensors, 2,498,560*r parameters (320M at r=128).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

HIDDEN, INTERMEDIATE, N_LAYERS = 4096, 11008, 32
#: (name, in_features, out_features) of LLaMA-2-7B's linear layers in one decoder layer
PROJECTIONS = (
    ("q_proj", HIDDEN, HIDDEN),
    ("k_proj", HIDDEN, HIDDEN),
    ("v_proj", HIDDEN, HIDDEN),
    ("o_proj", HIDDEN, HIDDEN),
    ("gate_proj", HIDDEN, INTERMEDIATE),
    ("up_proj", HIDDEN, INTERMEDIATE),
    ("down_proj", INTERMEDIATE, HIDDEN),
)


def lora_shapes(layers: int = N_LAYERS, rank: int = 8) -> List[Tuple[int, int]]:
    """Shapes of the LoRA A (r x in) and B (out x r) tensors of the first ``layers`` layers of LLaMA-2-7B."""
    shapes = []
    for _ in range(layers):
        for _, fin, fout in PROJECTIONS:
            shapes.append((rank, fin))
            shapes.append((fout, rank))
    return shapes


def numel(shapes: Sequence[Sequence[int]]) -> int:
    return sum(math.prod(s) for s in shapes)
