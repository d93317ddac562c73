"""LoRA fine-tuning with MGPO under DeepSpeed ZeRO (runs on 2 CPU processes in about half a minute).

    torchrun --nproc_per_node 2 examples/deepspeed_lora.py                 # ZeRO-2, bf16, CPU (gloo)
    torchrun --nproc_per_node 2 examples/deepspeed_lora.py --stage 3 --fp32
    deepspeed --num_gpus 2 examples/deepspeed_lora.py                       # on GPUs (nccl)

A tiny LlamaForCausalLM built from a config (nothing is downloaded) with PEFT LoRA adapters and LoRA+ groups;
swap in your model and data.  What matters for MGPO:

* ``deepspeed.initialize(optimizer=MGPO(...))`` with ``"zero_allow_untested_optimizer": true`` and no
  ``"optimizer"`` section; DeepSpeed's ``gradient_clipping`` (or MGPO's ``max_grad_norm``) as you prefer;
* theta at rest: between steps the model (its bf16 copy included) holds theta, so evaluation, ``save_checkpoint``
  and the adapter you keep need nothing special; ``load_checkpoint`` continues the run exactly.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import deepspeed
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from mgpo_kernels.integrations.common import find_mgpo
from mgpo_kernels.integrations.hf import mgpo_for_peft

VOCAB, SEQ = 64, 16


def batch(k: int, n: int = 4):
    """Micro-batch ``k`` (arithmetic sequences mod VOCAB): each rank asks for its own ``k``."""
    g = torch.Generator().manual_seed(k)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(SEQ)) % VOCAB
    return {"input_ids": ids, "labels": ids}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    ap.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:  # DeepSpeed's CPU accelerator: gloo, and no need for its inference-only shared-memory op
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    opt = mgpo_for_peft(model, lr=2e-3, loraplus_lr_ratio=16, rho=0.01, ema_beta=0.8)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": args.stage}, "bf16": {"enabled": not args.fp32},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    dtype = next(engine.module.parameters()).dtype

    for step in range(args.steps):
        engine.train()
        loss = engine(**batch(step * world + rank)).loss  # the forward sees theta + eps
        engine.backward(loss)
        engine.step()  # theta_{t+1}: between steps the model holds theta
        if step % 5 == 4:
            engine.eval()
            with torch.no_grad():  # evaluation at theta, nothing to switch
                eval_loss = engine(**batch(10_000)).loss
            if rank == 0:
                print(f"step {step + 1:3d}  train loss {loss.item():.4f}  eval loss {eval_loss.item():.4f}")
    mgpo = find_mgpo(engine.optimizer)
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="last")  # theta + MGPO's moments and global scalars
    if rank == 0:
        state = {k: round(float(v), 4) for k, v in mgpo.global_state.items()}
        print(f"ZeRO-{args.stage} {dtype}: {state['step']:.0f} MGPO steps, gbar {state['gbar']}, "
              f"eps applied now: {mgpo.perturbation_applied}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
