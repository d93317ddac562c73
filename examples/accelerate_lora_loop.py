"""LoRA fine-tuning with MGPO in your own accelerate loop (runs on a CPU in seconds).

    python examples/accelerate_lora_loop.py
    accelerate launch examples/accelerate_lora_loop.py --steps 40     # DDP over several processes

A tiny LlamaForCausalLM built from a config (nothing is downloaded) and synthetic token sequences; swap in your
model and data.  What matters for MGPO:

* ``MGPO(max_grad_norm=...)``: clipping fused into the step (instead of ``accelerator.clip_grad_norm_``);
* ``accelerator.accumulate(model)``: one MGPO step per window, all micro-batches at the same perturbed point;
* theta at rest: between steps the model holds theta, so evaluation, ``accelerator.save_state()`` and the weights
  you keep need nothing special; ``load_state()`` into fresh objects continues the run exactly.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from mgpo_kernels.integrations.common import find_mgpo
from mgpo_kernels.integrations.hf import mgpo_for_peft

VOCAB, SEQ = 64, 16


def batch(k: int, n: int = 4):
    """Micro-batch ``k``: arithmetic sequences mod VOCAB (the same data whichever process or run asks)."""
    g = torch.Generator().manual_seed(k)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(SEQ)) % VOCAB
    return {"input_ids": ids, "labels": ids}


def build(args, seed: int = 0):
    accelerator = Accelerator(gradient_accumulation_steps=args.accum)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    opt = mgpo_for_peft(model, lr=3e-3, loraplus_lr_ratio=4, rho=0.05, ema_beta=0.9, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    return accelerator, model, opt, sched


def train(accelerator, model, opt, sched, start: int, stop: int, accum: int):
    model.train()
    for k in range(start * accum, stop * accum):
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch(k)).loss)
            opt.step()
            sched.step()
            opt.zero_grad()


@torch.no_grad()
def evaluate(model) -> float:
    model.eval()
    loss = sum(float(model(**batch(10_000 + i)).loss) for i in range(4)) / 4
    model.train()
    return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--accum", type=int, default=2)
    args = ap.parse_args()
    half = args.steps // 2

    accelerator, model, opt, sched = build(args)
    train(accelerator, model, opt, sched, 0, half, args.accum)
    accelerator.print(f"step {half}: eval loss at theta {evaluate(model):.4f}")
    with tempfile.TemporaryDirectory() as ckpt:
        accelerator.save_state(ckpt)  # mid-training: the model holds theta between steps
        train(accelerator, model, opt, sched, half, args.steps, args.accum)
        uninterrupted = [p.detach().clone() for p in model.parameters() if p.requires_grad]

        # a "new process": fresh objects (other random LoRA init), everything from the checkpoint
        accelerator, model, opt, sched = build(args, seed=1)
        accelerator.load_state(ckpt)
        train(accelerator, model, opt, sched, half, args.steps, args.accum)
    resumed = [p.detach() for p in model.parameters() if p.requires_grad]
    err = max(float((a - b).norm() / b.norm()) for a, b in zip(resumed, uninterrupted))
    accelerator.print(f"step {args.steps}: eval loss at theta {evaluate(model):.4f}; resumed vs uninterrupted "
                      f"max relative difference {err:.1e}; {find_mgpo(opt).global_state['step']:.0f} MGPO steps")
    lora_theta = accelerator.get_state_dict(model)  # the weights to keep: theta
    accelerator.print(f"{len(lora_theta)} tensors in the state dict (theta)")


if __name__ == "__main__":
    main()
