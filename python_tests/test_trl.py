"""MGPO with TRL's SFTTrainer and a PEFT LoRA config (tiny LlamaForCausalLM from a config, a word-level tokenizer
built here; nothing is downloaded).

The trap: ``SFTTrainer(peft_config=..., optimizers=(MGPO(model.parameters()), None))`` builds the optimizer over the
base model before SFTTrainer adds the adapters, so it trains nothing; MGPOCallback must say so.  The right path,
``optimizer_cls_and_kwargs=mgpo_optimizer_cls_and_kwargs(...)`` (with or without MGPOCallback), trains every LoRA
tensor, its checkpoints and final weights are theta (the parameters between steps, which the next training forward
sees plus eps = coef * m), and it resumes exactly.
"""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from mgpo_kernels import MGPO  # noqa: E402
from mgpo_kernels.integrations.hf import MGPOCallback, find_mgpo, mgpo_optimizer_cls_and_kwargs  # noqa: E402

BACKEND = "reference"
WORDS = 40
VOCAB = WORDS + 3  # + <unk>, <pad>, </s>
N_LORA = 2 * 7 * 2  # 2 layers x 7 linear modules x (A, B)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(WORDS)}
    vocab.update({"<unk>": WORDS, "<pad>": WORDS + 1, "</s>": WORDS + 2})
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def make_dataset(n: int = 32, seed: int = 0):
    """Arithmetic word sequences (next word = previous + a per-sequence stride): something to learn."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, WORDS, (n,), generator=g).tolist()
    stride = torch.randint(1, 4, (n,), generator=g).tolist()
    texts = [" ".join(f"w{(s + d * k) % WORDS}" for k in range(11)) for s, d in zip(start, stride)]
    return datasets.Dataset.from_dict({"text": texts})


def make_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=WORDS + 1, eos_token_id=WORDS + 2, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


def make_args(out, **kw) -> SFTConfig:
    base = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=0.0, save_strategy="steps", save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, gradient_checkpointing=False, max_length=16,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, data_seed=0, save_only_model=False,
    )
    base.update(kw)
    return SFTConfig(**base)


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def mgpo_kw():
    return mgpo_optimizer_cls_and_kwargs(lr=3e-3, rho=0.05, ema_beta=0.9, backend=BACKEND)


def test_optimizer_built_before_peft_trains_nothing_and_the_callback_warns(tmp_path):
    base = make_base()
    opt = MGPO(base.parameters(), lr=3e-3, backend=BACKEND)  # the base model's parameters, before PEFT
    trainer = SFTTrainer(model=base, args=make_args(tmp_path, max_steps=2, save_strategy="no"),
                         train_dataset=make_dataset(), processing_class=make_tokenizer(),
                         peft_config=peft.LoraConfig(**LORA), optimizers=(opt, None), callbacks=[MGPOCallback()])
    before = snapshot(trainer.model)
    assert len(before) == N_LORA
    with pytest.warns(UserWarning, match=rf"holds none of the model's {N_LORA} trainable parameters.*lora_") as rec:
        trainer.train()
    assert sum("MGPOCallback" in str(w.message) for w in rec) == 1
    # what the warning is about: nothing trained
    after = snapshot(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert int(opt.state_dict()["mgpo"]["step"]) == 0


class Probe(TrainerCallback):
    """At every on_step_end: the LoRA weights (``rest``) and eps = coef * m; a forward pre-hook records what the
    first training forward after each step sees (by definition theta + eps)."""

    def __init__(self):
        self.rest, self.eps, self.forward, self.pending, self.model = {}, {}, {}, None, None

    def attach(self, model):
        self.model = model
        model.register_forward_pre_hook(self._pre)  # after MGPO's global hook (the apply pass)

    def _pre(self, module, args):
        if self.pending is not None and module.training and torch.is_grad_enabled():
            self.forward[self.pending] = snapshot(self.model)
            self.pending = None

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        opt = find_mgpo(optimizer)
        assert not opt.perturbation_applied
        s = state.global_step
        self.rest[s] = snapshot(self.model)
        coef = opt.global_state["coef"]
        self.eps[s] = {n: (coef * opt.state[p]["exp_avg"]).clone() for n, p in lora_params(self.model).items()}
        self.pending = s


def run_sft(out, resume=None, scramble=False, callback=True):
    probe = Probe()
    trainer = SFTTrainer(model=make_base(), args=make_args(out), train_dataset=make_dataset(),
                         processing_class=make_tokenizer(), peft_config=peft.LoraConfig(**LORA),
                         optimizer_cls_and_kwargs=mgpo_kw(), callbacks=[probe] + ([MGPOCallback()] if callback else []))
    probe.attach(trainer.model)
    if resume is not None:  # also record the first forward after the resume (the one after checkpoint-N's step)
        probe.pending = int(str(resume).rsplit("-", 1)[1])
    trainer.probe = probe
    init = snapshot(trainer.model)
    if scramble:  # the LoRA weights must then come from the checkpoint
        with torch.no_grad():
            for p in lora_params(trainer.model).values():
                p.normal_()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    assert not [w for w in rec if "MGPO" in str(w.message)], [str(w.message) for w in rec]
    return trainer, init


@pytest.mark.parametrize("callback", [True, False])
def test_optimizer_cls_and_kwargs_trains_lora_and_resume_is_exact(tmp_path, callback):
    trainer, init = run_sft(tmp_path / "full", callback=callback)
    opt = find_mgpo(trainer.optimizer)
    assert int(opt.state_dict()["mgpo"]["step"]) == 4
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    params = lora_params(trainer.model)
    assert len(params) == N_LORA and all(id(p) in held for p in params.values())
    final = snapshot(trainer.model)
    assert all(not torch.equal(init[n], final[n]) for n in init)  # every LoRA tensor trained
    probe = trainer.probe
    assert not opt.perturbation_applied and sorted(probe.forward) == [1, 2, 3]
    for s in (1, 2, 3):  # the parameters between steps are theta: the next training forward sees them + eps
        for n, t in probe.forward[s].items():
            torch.testing.assert_close(t, probe.rest[s][n] + probe.eps[s][n], rtol=1e-6, atol=1e-8, msg=n)
    eps2 = max(float(e.norm() / probe.rest[2][n].norm()) for n, e in probe.eps[2].items())
    assert eps2 > 1e-3, eps2  # the checks below tell theta from theta + eps
    assert all(torch.equal(final[n], probe.rest[4][n]) for n in final)  # the model holds theta_4 after train()
    for s in (2, 4):  # the checkpoints' adapter weights are theta
        saved = safetensors_torch.load_file(str(tmp_path / "full" / f"checkpoint-{s}" / "adapter_model.safetensors"))
        assert len(saved) == N_LORA
        for n, t in probe.rest[s].items():
            torch.testing.assert_close(saved[n.replace(".default.", ".")], t, rtol=0, atol=0, msg=n)

    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", ckpt)
    resumed, _ = run_sft(tmp_path / "resumed", resume=str(ckpt), scramble=True, callback=callback)
    ropt = find_mgpo(resumed.optimizer)
    assert int(ropt.state_dict()["mgpo"]["step"]) == 4
    rparams = lora_params(resumed.model)
    assert sorted(resumed.probe.forward) == [2, 3]
    for s in (2, 3):  # the resumed run's forwards see the uninterrupted run's theta + eps
        for n, t in resumed.probe.forward[s].items():
            torch.testing.assert_close(t, probe.forward[s][n], rtol=1e-6, atol=1e-9, msg=f"{s} {n}")
    for n, p in params.items():
        q = rparams[n]
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-9, msg=n)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ropt.state[q][key], opt.state[p][key], rtol=1e-6, atol=1e-12, msg=n)
