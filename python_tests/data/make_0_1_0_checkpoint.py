"""Writes a state dict with mgpo_kernels 0.1.0 (git 322cd83, reference backend): the model saved mid-training
(theta + eps, as accelerate/Lightning/torch.save did then), and where the uninterrupted 0.1.0 run ends.

How it was made (from a clone):  mkdir -p /tmp/old010 && git archive 322cd83 mgpo_kernels | tar -x -C /tmp/old010
                                 python python_tests/data/make_0_1_0_checkpoint.py
"""
import copy
import os
import sys

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mgpo-0.1.0-checkpoint.pt")
sys.path.insert(0, "/tmp/old010")
import mgpo_kernels
assert mgpo_kernels.__version__ == "0.1.0", mgpo_kernels.__file__
from mgpo_kernels import MGPO
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

def batch(t):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)

model = make()
opt = MGPO(model.parameters(), lr=3e-2, rho=0.05, weight_decay=0.01, backend="reference")
def step(t):
    x, y = batch(t)
    ((model(x) - y) ** 2).mean().backward()
    opt.step(); opt.zero_grad()
for t in range(3):
    step(t)
ck = {"model": {k: v.clone() for k, v in model.state_dict().items()},
      "opt": copy.deepcopy(opt.state_dict())}  # torch's state_dict holds the live tensors
for t in range(3, 6):
    step(t)
opt.eval()
ck["theta_after_6"] = [p.detach().clone() for p in model.parameters()]
torch.save(ck, OUT)
print("written", OUT)
