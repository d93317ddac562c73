"""LoRA fine-tuning with MGPO under the Hugging Face Trainer (runs on a CPU in about a minute).

    python examples/hf_trainer_lora.py                 # tiny random Llama, synthetic data, prints the losses
    python examples/hf_trainer_lora.py --steps 200 --backend reference --rho 0.01

The model is a small LlamaForCausalLM built from a config (random weights, nothing is downloaded) and the data are
synthetic token sequences with a learnable pattern; swap in your model (``AutoModelForCausalLM.from_pretrained``)
and dataset.  What matters for MGPO is in ``main()``:

* ``mgpo_for_peft(model, ...)``: MGPO over the trainable LoRA parameters only, LoRA+ lr for the B matrices;
* ``optimizers=(opt, None)``: the Trainer builds its lr scheduler around it (``optimizer_cls_and_kwargs=
  mgpo_optimizer_cls_and_kwargs(lr=..., ...)`` is the equivalent one-liner);
* theta at rest: between steps the model holds theta, so evaluation, checkpoints and the final weights are theta
  with nothing extra; ``callbacks=[MGPOCallback()]`` is optional and only checks the setup (e.g. an MGPO built
  before the adapters existed);
* ``max_grad_norm=0`` on the Trainer with ``MGPO(max_grad_norm=1.0)``: clipping fused into the optimizer step
  (same result as the Trainer clipping, one pass less over the gradients).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch


def synthetic_dataset(n: int, seq: int, vocab: int, seed: int):
    """Arithmetic sequences mod vocab with 10% noise tokens: a pattern a LoRA adapter can learn."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 8, (n, 1), generator=g)
    ids = (start + stride * torch.arange(seq)) % vocab
    noise = torch.rand(n, seq, generator=g) < 0.1
    ids = torch.where(noise, torch.randint(0, vocab, (n, seq), generator=g), ids)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i].clone()}

    return DS()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--loraplus-lr-ratio", type=float, default=4.0)
    ap.add_argument("--rho", type=float, default=0.01, help="paper: 0.01 for LLaMA NLG, 0.05 for NLU")
    ap.add_argument("--ema-beta", type=float, default=0.8, help="paper: 0.8 NLG, 0.9 NLU")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--output-dir", default=None, help="default: a temporary folder")
    args = ap.parse_args(argv)

    import peft
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator
    from transformers.utils import logging as hf_logging

    from mgpo_kernels.integrations.hf import MGPOCallback, find_mgpo, mgpo_for_peft

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)
    vocab, seq = 128, 32
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    model = peft.get_peft_model(
        LlamaForCausalLM(config),
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    model.print_trainable_parameters()

    opt = mgpo_for_peft(model, lr=args.lr, loraplus_lr_ratio=args.loraplus_lr_ratio, rho=args.rho,
                        ema_beta=args.ema_beta, max_grad_norm=1.0, backend=args.backend)
    out = args.output_dir or tempfile.mkdtemp(prefix="mgpo_lora_")
    targs = TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        per_device_eval_batch_size=32, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=5,
        max_grad_norm=0.0,  # clipping is fused into MGPO (max_grad_norm=1.0 above)
        eval_strategy="steps", eval_steps=max(1, args.steps // 4), save_strategy="steps",
        save_steps=max(1, args.steps // 2), logging_steps=max(1, args.steps // 6), report_to="none", use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=synthetic_dataset(512, seq, vocab, 1),
        eval_dataset=synthetic_dataset(64, seq, vocab, 2), data_collator=default_data_collator,
        optimizers=(opt, None), callbacks=[MGPOCallback()],
    )
    first = trainer.evaluate()["eval_loss"]
    t0 = time.time()
    result = trainer.train()
    final = trainer.evaluate()["eval_loss"]
    trainer.save_model(os.path.join(out, "final"))  # theta (at rest between steps)
    mgpo = find_mgpo(trainer.optimizer)
    print(f"backend={mgpo.backend}  steps={result.global_step}  train time {time.time() - t0:.1f}s")
    print(f"train loss {result.training_loss:.4f}")
    print(f"eval loss  {first:.4f} -> {final:.4f}  (unperturbed weights)")
    print(f"skipped steps {mgpo.skipped_steps}; adapter saved to {os.path.join(out, 'final')}")
    return final


if __name__ == "__main__":
    main()
