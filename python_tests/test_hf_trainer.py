"""MGPO under the Hugging Face Trainer with a PEFT LoRA model (tiny LlamaForCausalLM built from a config, CPU).

Theta at rest: between steps the parameters hold theta, so everything the Trainer does between steps (evaluation,
checkpoints, save_model from any callback, load_best_model_at_end) sees theta without MGPOCallback.  theta is
checked against its definition: the first training forward after step s sees theta_s + eps_s (eps_s = coef * m),
recorded by a forward pre-hook independently of the library's flags.  Checks: evaluation equals a manual evaluation
at theta (and differs from one at theta + eps), checkpoint adapter weights, save_model() from a user callback and the
weights left after training are theta, resume_from_checkpoint (with or without MGPOCallback) reproduces the
uninterrupted run, the Trainer's clipping equals MGPO's fused clipping, the optimizer_cls_and_kwargs / factory form
(no warning without a callback), and two PEFT loops: AdaLoRA's pruning between steps (against a float64 reference)
and set_adapter switching with a torch.save / load resume.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from mgpo_kernels import MGPO  # noqa: E402
from mgpo_kernels.integrations.hf import (  # noqa: E402
    MGPOCallback,
    MGPOForPeft,
    find_mgpo,
    lora_param_groups,
    mgpo_for_peft,
    mgpo_optimizer_cls_and_kwargs,
)

SEQ = 16
VOCAB = 64
BACKEND = "reference"  # the Trainer path is backend-agnostic; the kernels are tested elsewhere
MGPO_KW = dict(lr=3e-3, rho=0.05, ema_beta=0.9, backend=BACKEND)


class TokenDataset(torch.utils.data.Dataset):
    """Sequences with learnable structure (next token = previous + a per-sequence stride, mod VOCAB)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB
        noise = torch.rand(n, SEQ, generator=g) < 0.1
        self.ids = torch.where(noise, torch.randint(0, VOCAB, (n, SEQ), generator=g), self.ids)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


TRAIN = TokenDataset(48, seed=1)
EVAL = TokenDataset(16, seed=2)


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(cfg)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                           init_lora_weights="gaussian")
    model = peft.get_peft_model(base, lcfg)
    # LoRA initialises B = 0; give B small values too, so A and B both move and the perturbation shows early
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    return model


def make_args(out, **kw):
    base = dict(
        output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8,
        gradient_accumulation_steps=2, max_steps=20, learning_rate=3e-3, lr_scheduler_type="linear",
        warmup_steps=2, weight_decay=0.0, max_grad_norm=0.0, eval_strategy="steps", eval_steps=4,
        save_strategy="steps", save_steps=5, logging_steps=2, report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True, save_only_model=False,
    )
    base.update(kw)
    return TrainingArguments(**base)


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def manual_eval_loss(model, dataset, batch_size=8):
    """What Trainer.evaluate computes: the batch-size weighted mean of the per-batch mean losses."""
    was = model.training
    model.eval()
    losses, sizes = [], []
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            batch = default_data_collator([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            losses.append(model(**batch).loss.double())
            sizes.append(batch["input_ids"].shape[0])
    model.train(was)
    return float(sum(l * s for l, s in zip(losses, sizes)) / sum(sizes))


def clone_params(model):
    return {n: p.detach().clone() for n, p in lora_params(model).items()}


def rel_dist(a, b):
    """max over tensors of |a - b| / |b| (dicts of tensors with the same keys)."""
    return max(float((a[n].double() - b[n].double()).norm() / b[n].double().norm().clamp_min(1e-30)) for n in b)


class Recorder(TrainerCallback):
    """At every on_step_end (after the optimizer step; the Trainer evaluates and saves after it): what the
    parameters hold (``rest``), eps = coef * m, and whether MGPO says eps is applied.  A forward pre-hook on the model
    records what the first training forward after each step sees (``forward``): by definition theta_s + eps_s, so
    ``forward[s] == rest[s] + eps[s]`` proves rest[s] is theta_s.  At steps that evaluate or save (and the last one),
    manual evaluation losses at rest and at rest + eps (the latter put in and taken out by hand)."""

    def __init__(self, model):
        self.model = model
        self.rest, self.eps, self.applied, self.forward, self.loss_rest, self.loss_perturbed = {}, {}, {}, {}, {}, {}
        self.pending = None
        model.register_forward_pre_hook(self._pre_forward)  # runs after the global hooks (MGPO's apply pass)

    def _pre_forward(self, module, args):
        if self.pending is not None and module.training and torch.is_grad_enabled():
            self.forward[self.pending] = clone_params(self.model)
            self.pending = None

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        opt = find_mgpo(optimizer)
        assert opt is not None
        s = state.global_step
        params = lora_params(self.model)
        coef = opt.global_state["coef"]
        self.rest[s] = clone_params(self.model)
        self.eps[s] = {n: (coef * opt.state[p]["exp_avg"]).detach().clone() for n, p in params.items()}
        self.applied[s] = opt.perturbation_applied
        self.pending = s
        if not (control.should_evaluate or control.should_save or state.global_step == state.max_steps):
            return
        self.loss_rest[s] = manual_eval_loss(self.model, EVAL)
        with torch.no_grad():
            for n, p in params.items():
                p.add_(self.eps[s][n])
            self.loss_perturbed[s] = manual_eval_loss(self.model, EVAL)
            for n, p in params.items():
                p.copy_(self.rest[s][n])


def assert_rest_is_theta(rec, steps=None, min_eps=1e-3):
    """rest[s] is theta_s: the next training forward saw rest[s] + eps[s]; and eps is not negligible there, so the
    check tells theta from theta + eps."""
    steps = sorted(rec.forward) if steps is None else steps
    assert steps
    for s in steps:
        assert rec.applied[s] is False, s
        expected = {n: rec.rest[s][n] + rec.eps[s][n] for n in rec.rest[s]}
        for n, t in rec.forward[s].items():
            torch.testing.assert_close(t, expected[n], rtol=1e-6, atol=1e-8, msg=f"forward after step {s}: {n}")
        assert rel_dist(expected, rec.rest[s]) > min_eps, (s, rel_dist(expected, rec.rest[s]))


def run_trainer(out, model=None, callbacks=None, resume=None, optimizer=None, mgpo_callback=True, **arg_kw):
    model = make_model() if model is None else model
    opt = MGPO(lora_param_groups(model, MGPO_KW["lr"]), **MGPO_KW) if optimizer is None else optimizer
    trainer = Trainer(
        model=model, args=make_args(out, **arg_kw), train_dataset=TRAIN, eval_dataset=EVAL,
        data_collator=default_data_collator, optimizers=(opt, None),
        callbacks=(callbacks or []) + ([MGPOCallback()] if mgpo_callback else []),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frameworks' own noise; MGPO's warnings still reach the test
        warnings.filterwarnings("always", message=r"(?s).*MGPO")
        trainer.train(resume_from_checkpoint=resume)
    return trainer, model, opt


def adapter_name(param_name: str) -> str:
    return param_name.replace(".default.", ".")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    model = make_model()
    rec = Recorder(model)
    trainer, model, opt = run_trainer(out, model=model, callbacks=[rec])
    return out, trainer, model, opt, rec


def test_trainer_calls_optimizer_train_eval_through_accelerate(full_run):
    _, trainer, _, opt, _ = full_run
    from accelerate.optimizer import AcceleratedOptimizer

    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    assert find_mgpo(trainer.optimizer) is opt
    assert find_mgpo(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])) is None
    # the wrapper forwards train()/eval() (this is what Trainer.training_step / evaluation_loop call)
    trainer.optimizer.train()
    assert opt.training
    trainer.optimizer.eval()
    assert not opt.training


def test_params_between_steps_are_theta(full_run):
    _, _, _, opt, rec = full_run
    assert sorted(rec.rest) == list(range(1, 21)) and sorted(rec.forward) == list(range(1, 20))
    assert_rest_is_theta(rec)
    assert rec.applied[20] is False and not opt.perturbation_applied


def test_eval_loss_is_at_unperturbed_weights(full_run):
    _, trainer, _, opt, rec = full_run
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert sorted(evals) == [4, 8, 12, 16, 20]
    assert_rest_is_theta(rec, [4, 8, 12, 16])  # step 20 has no forward after it; test_weights_after_training
    for s, loss in evals.items():
        assert math.isclose(loss, rec.loss_rest[s], rel_tol=2e-6), (s, loss, rec.loss_rest[s])
        # the test can tell the two apart: the perturbed loss differs by much more than the tolerance
        assert abs(rec.loss_perturbed[s] - rec.loss_rest[s]) > 1e-4 * abs(loss), (s, rec.loss_perturbed[s])
    # training actually happened
    assert evals[20] < evals[4]


def test_checkpoint_adapter_weights_are_unperturbed(full_run):
    out, _, model, opt, rec = full_run
    ckpts = sorted(int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert ckpts == [5, 10, 15, 20]  # saves at 5, 15 come without an evaluation before them
    assert_rest_is_theta(rec, [5, 10, 15])
    for s in ckpts:
        saved = safetensors_torch.load_file(os.path.join(out, f"checkpoint-{s}", "adapter_model.safetensors"))
        theta = {adapter_name(n): t for n, t in rec.rest[s].items()}
        pert = {adapter_name(n): t + rec.eps[s][n] for n, t in rec.rest[s].items()}
        assert set(saved) == set(theta)
        assert rel_dist(saved, pert) > 1e-3, "saved weights should differ from the perturbed ones"
        for n, t in saved.items():
            torch.testing.assert_close(t, theta[n], rtol=0, atol=0, msg=f"step {s} {n}")


def test_weights_after_training_are_unperturbed(full_run, tmp_path):
    _, trainer, model, opt, rec = full_run
    assert not opt.perturbation_applied
    for n, p in lora_params(model).items():
        torch.testing.assert_close(p.detach(), rec.rest[20][n], rtol=0, atol=0)
    # the first training forward now would apply eps_20 (it is due): the model holds theta_20, not theta_20 + eps_20
    assert rel_dist({n: t + rec.eps[20][n] for n, t in rec.rest[20].items()}, rec.rest[20]) > 1e-3
    # save_model after training writes theta
    trainer.save_model(str(tmp_path / "final"))
    saved = safetensors_torch.load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    for n, p in lora_params(model).items():
        torch.testing.assert_close(saved[adapter_name(n)], p.detach(), rtol=0, atol=0)


class SaveModelMidTraining(TrainerCallback):
    """A user callback that calls trainer.save_model() from on_step_end (no evaluation or checkpoint just before)."""

    def __init__(self, model, steps, out, stop_at):
        self.model, self.steps, self.out, self.stop_at = model, set(steps), out, stop_at
        self.trainer, self.at_save = None, {}

    def on_step_end(self, args, state, control, **kw):
        if state.global_step in self.steps:
            self.at_save[state.global_step] = clone_params(self.model)
            self.trainer.save_model(os.path.join(self.out, f"saved-{state.global_step}"))
        if state.global_step == self.stop_at:  # (keeps the test short; the lr schedule is still full_run's)
            control.should_training_stop = True


def test_save_model_from_a_callback_mid_training_saves_theta(full_run, tmp_path):
    """trainer.save_model() in a user callback's on_step_end, with no evaluation or checkpoint around it, writes
    theta (the parameters at that moment); the run goes on exactly as the uninterrupted full_run (same args, stopped
    after step 9)."""
    _, _, _, _, full_rec = full_run
    model = make_model()
    rec = Recorder(model)
    saver = SaveModelMidTraining(model, steps=(3, 7), out=str(tmp_path), stop_at=9)
    model_opt = MGPO(lora_param_groups(model, MGPO_KW["lr"]), **MGPO_KW)
    trainer = Trainer(model=model, args=make_args(tmp_path / "run", eval_strategy="no", save_strategy="no"),
                      train_dataset=TRAIN, data_collator=default_data_collator, optimizers=(model_opt, None),
                      callbacks=[rec, saver])
    saver.trainer = trainer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "MGPO" in str(w.message)], [str(w.message) for w in caught]
    assert sorted(saver.at_save) == [3, 7]
    assert_rest_is_theta(rec, [3, 7])
    for s in (3, 7):
        saved = safetensors_torch.load_file(str(tmp_path / f"saved-{s}" / "adapter_model.safetensors"))
        assert set(saved) == {adapter_name(n) for n in saver.at_save[s]}
        for n, t in saver.at_save[s].items():
            torch.testing.assert_close(saved[adapter_name(n)], t, rtol=0, atol=0, msg=f"step {s} {n}")
            # the uninterrupted run (evaluating and checkpointing at other steps) had the same theta there
            torch.testing.assert_close(saved[adapter_name(n)], full_rec.rest[s][n], rtol=1e-6, atol=1e-9)
        pert = {adapter_name(n): t + rec.eps[s][n] for n, t in saver.at_save[s].items()}
        assert rel_dist(saved, pert) > 1e-3
    assert sorted(rec.rest) == list(range(1, 10))
    for n, p in lora_params(model).items():
        torch.testing.assert_close(p.detach(), full_rec.rest[9][n], rtol=1e-6, atol=1e-9, msg=n)


def test_resume_from_checkpoint_matches_uninterrupted(full_run, tmp_path):
    out, _, model_full, opt_full, _ = full_run
    import shutil

    ckpt = tmp_path / "checkpoint-10"
    shutil.copytree(out / "checkpoint-10", ckpt)
    # a fresh model (same frozen base) with scrambled LoRA weights: they must come from the checkpoint, the
    # optimizer state (incl. the perturbation coefficient and gbar) from optimizer.pt
    fresh = make_model()
    with torch.no_grad():
        for p in lora_params(fresh).values():
            p.normal_()
    _, model, opt = run_trainer(tmp_path, model=fresh, resume=str(ckpt))
    assert int(opt.global_state["step"].item()) == 20
    full = lora_params(model_full)
    for n, p in lora_params(model).items():
        torch.testing.assert_close(p.detach(), full[n].detach(), rtol=0, atol=0, msg=n)
    for n, p in lora_params(model).items():
        torch.testing.assert_close(opt.state[p]["exp_avg"], opt_full.state[full[n]]["exp_avg"], rtol=1e-6,
                                   atol=1e-9)


def test_fused_clipping_matches_trainer_clipping(tmp_path):
    """Trainer(max_grad_norm=0) + MGPO(max_grad_norm=c) == Trainer(max_grad_norm=c) + MGPO()."""
    c = 0.05
    common = dict(max_steps=8, eval_strategy="no", save_strategy="no", logging_steps=1)
    m1 = make_model()
    o1 = MGPO(lora_param_groups(m1, MGPO_KW["lr"]), **MGPO_KW)
    t1, _, _ = run_trainer(tmp_path / "trainer_clip", model=m1, optimizer=o1, max_grad_norm=c, **common)
    m2 = make_model()
    o2 = MGPO(lora_param_groups(m2, MGPO_KW["lr"]), max_grad_norm=c, **MGPO_KW)
    run_trainer(tmp_path / "fused_clip", model=m2, optimizer=o2, max_grad_norm=0.0, **common)
    norms = [h["grad_norm"] for h in t1.state.log_history if "grad_norm" in h]
    assert len(norms) == 8 and min(norms) > 2 * c, norms  # clipping is active in every step
    p2 = lora_params(m2)
    for n, p in lora_params(m1).items():
        torch.testing.assert_close(p.detach(), p2[n].detach(), rtol=2e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(o1.global_state["gbar"], o2.global_state["gbar"], rtol=1e-5, atol=0)


def test_optimizer_cls_and_kwargs_form_and_loraplus(tmp_path):
    common = dict(max_steps=4, eval_strategy="no", save_strategy="no")
    kw = dict(lr=3e-3, loraplus_lr_ratio=4.0, rho=0.05, backend=BACKEND)
    m1 = make_model()
    t1 = Trainer(model=m1, args=make_args(tmp_path / "a", **common), train_dataset=TRAIN,
                 data_collator=default_data_collator, optimizer_cls_and_kwargs=mgpo_optimizer_cls_and_kwargs(**kw),
                 callbacks=[MGPOCallback()])
    t1.train()
    o1 = find_mgpo(t1.optimizer)
    assert isinstance(o1, MGPO) and len(o1.param_groups) == 2
    names = {id(p): n for n, p in m1.named_parameters()}
    assert all("lora_A" in names[id(p)] for p in o1.param_groups[0]["params"])
    assert all("lora_B" in names[id(p)] for p in o1.param_groups[1]["params"])
    assert o1.param_groups[0]["initial_lr"] == 3e-3
    assert math.isclose(o1.param_groups[1]["initial_lr"], 4.0 * 3e-3, rel_tol=1e-12)
    # same as building it explicitly and passing optimizers=(opt, None)
    m2 = make_model()
    _, _, o2 = run_trainer(tmp_path / "b", model=m2, optimizer=mgpo_for_peft(m2, **kw), **common)
    p2 = lora_params(m2)
    for n, p in lora_params(m1).items():
        torch.testing.assert_close(p.detach(), p2[n].detach(), rtol=0, atol=0, msg=n)


def test_lora_param_groups_selection_and_errors():
    model = make_model()
    groups = lora_param_groups(model, 1e-3)
    assert len(groups) == 1 and len(groups[0]["params"]) == sum(1 for _ in lora_params(model).values())
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        lora_param_groups(model, 1e-3, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="no trainable LoRA"):
        lora_param_groups(torch.nn.Linear(2, 2), 1e-3)
    # a trainable non-LoRA parameter (e.g. modules_to_save) is named in a warning, or included on request
    model.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="lm_head"):
        groups = lora_param_groups(model, 1e-3)
    assert all(p is not model.base_model.model.lm_head.weight for g in groups for p in g["params"])
    groups = lora_param_groups(model, torch.tensor(1e-3), loraplus_lr_ratio=2.0, include_non_lora=True)
    assert len(groups) == 3 and torch.is_tensor(groups[1]["lr"]) and groups[1]["lr"].item() == pytest.approx(2e-3)
    assert groups[0]["lr"] is not groups[2]["lr"]  # separate tensors: a scheduler sets each group's lr


def test_callback_refuses_a_replaced_mgpo_and_warns_without_mgpo():
    """transformers' DeepSpeed integration drops optimizers=(MGPO, None) and builds its own optimizer: the callback
    sees the MGPO at on_init_end and another optimizer at on_train_begin, and says what to do."""
    opt = MGPO([torch.nn.Parameter(torch.ones(3))], backend=BACKEND)
    Wrapper = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"})
    ds = Wrapper()
    ds.optimizer = opt
    outer = type("DeepSpeedOptimizerWrapper", (), {})()
    outer.optimizer = ds
    assert find_mgpo(outer) is opt
    ds_args = type("Args", (), {"deepspeed": {"zero_optimization": {"stage": 2}}})()
    cb = MGPOCallback()
    cb.on_init_end(ds_args, None, None, optimizer=opt)
    cb.on_train_begin(ds_args, None, None, optimizer=outer)  # MGPO inside DeepSpeed's wrapper: fine
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(RuntimeError, match="optimizer_cls_and_kwargs"):
        cb.on_train_begin(ds_args, None, None, optimizer=adamw)
    cb = MGPOCallback()  # built by optimizer_cls_and_kwargs, but a DeepSpeed "optimizer" section replaced it
    cb.on_init_end(ds_args, None, None, optimizer=None)
    with pytest.raises(RuntimeError, match='"optimizer"'):
        cb.on_train_begin(ds_args, None, None, optimizer=adamw)
    cb = MGPOCallback()
    with pytest.warns(UserWarning, match="not MGPO"):
        cb.on_train_begin(None, None, None, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]))
    assert isinstance(MGPOForPeft()(make_model(), lr=1e-3, backend=BACKEND), MGPO)


def test_load_best_model_at_end_keeps_best_theta(tmp_path):
    """load_best_model_at_end: the best checkpoint's theta is loaded into the model after the last step and stays
    there (nothing adds or subtracts eps afterwards).  greater_is_better=True on eval_loss makes the best checkpoint
    an early one, so the loaded weights differ from the last step's."""
    model = make_model()
    rec = Recorder(model)
    trainer, model, opt = run_trainer(tmp_path, model=model, callbacks=[rec], max_steps=10, eval_steps=4,
                                      save_steps=4, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                                      greater_is_better=True)
    assert not opt.perturbation_applied
    best_dir = trainer.state.best_model_checkpoint
    assert best_dir is not None
    best_step = int(os.path.basename(best_dir).split("-")[1])
    assert best_step in (4, 8), best_dir
    assert_rest_is_theta(rec, [best_step])
    saved = safetensors_torch.load_file(os.path.join(best_dir, "adapter_model.safetensors"))
    assert rel_dist(saved, {adapter_name(n): t for n, t in rec.rest[10].items()}) > 1e-3  # not the last step's
    for n, p in lora_params(model).items():
        torch.testing.assert_close(saved[adapter_name(n)], rec.rest[best_step][n], rtol=0, atol=0, msg=n)
        torch.testing.assert_close(p.detach(), saved[adapter_name(n)], rtol=0, atol=0, msg=n)


def test_callback_warns_when_mgpo_holds_part_or_none_of_the_trainable_parameters(tmp_path):
    model = make_model()
    params = lora_params(model)
    a_only = [p for n, p in params.items() if "lora_A" in n]
    opt = MGPO(a_only, **MGPO_KW)
    trainer = Trainer(model=model, args=make_args(tmp_path, max_steps=1, eval_strategy="no", save_strategy="no"),
                      train_dataset=TRAIN, data_collator=default_data_collator, optimizers=(opt, None),
                      callbacks=[MGPOCallback()])
    with pytest.warns(UserWarning, match=rf"holds {len(a_only)} of {len(params)} .*lora_B"):
        trainer.train()
    # none: an optimizer over the frozen base model's parameters (the TRL trap, see test_trl.py)
    frozen = MGPO([p for p in model.parameters() if not p.requires_grad], **MGPO_KW)
    with pytest.warns(UserWarning, match=rf"holds none of the model's {len(params)} trainable"):
        MGPOCallback().on_train_begin(None, None, None, optimizer=frozen, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MGPOCallback().on_train_begin(None, None, None, optimizer=MGPO(list(params.values()), **MGPO_KW),
                                      model=model)


def run_quietly_checked(fn, *args, **kw):
    """Run fn and fail on any warning that names MGPO (e.g. a step that no training forward perturbed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    assert not [w for w in caught if "MGPO" in str(w.message)], [str(w.message) for w in caught]
    return out


def test_without_callback_checkpoints_hold_theta_and_resume_is_exact(tmp_path):
    """No MGPOCallback: the Trainer's save_steps checkpoints hold theta (no evaluation before them), and
    resume_from_checkpoint in fresh objects continues the uninterrupted run: the first forward after the resume sees
    the same theta + eps, and the weights and moments end equal."""
    common = dict(max_steps=10, eval_strategy="no", save_steps=5, mgpo_callback=False)
    model = make_model()
    rec = Recorder(model)
    _, model, opt = run_quietly_checked(run_trainer, tmp_path / "full", model=model, callbacks=[rec], **common)
    assert not opt.perturbation_applied
    assert_rest_is_theta(rec, [5])
    saved = safetensors_torch.load_file(str(tmp_path / "full" / "checkpoint-5" / "adapter_model.safetensors"))
    for n, t in rec.rest[5].items():
        torch.testing.assert_close(saved[adapter_name(n)], t, rtol=0, atol=0, msg=n)
    assert rel_dist(saved, {adapter_name(n): t + rec.eps[5][n] for n, t in rec.rest[5].items()}) > 1e-3

    fresh = make_model()
    with torch.no_grad():
        for p in lora_params(fresh).values():
            p.normal_()
    rrec = Recorder(fresh)
    rrec.pending = 5  # the first training forward of the resumed run
    _, resumed, ropt = run_quietly_checked(run_trainer, tmp_path / "resumed", model=fresh, callbacks=[rrec],
                                           resume=str(tmp_path / "full" / "checkpoint-5"), **common)
    assert int(ropt.state_dict()["mgpo"]["step"]) == 10
    for n, t in rrec.forward[5].items():
        torch.testing.assert_close(t, rec.forward[5][n], rtol=1e-6, atol=1e-9, msg=n)
    full = lora_params(model)
    for n, p in lora_params(resumed).items():
        torch.testing.assert_close(p.detach(), full[n].detach(), rtol=1e-6, atol=1e-9, msg=n)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ropt.state[p][key], opt.state[full[n]][key], rtol=1e-6, atol=1e-12, msg=n)


def test_factory_without_callback_does_not_warn_and_saves_theta(tmp_path):
    kw = mgpo_optimizer_cls_and_kwargs(lr=3e-3, rho=0.05, backend=BACKEND)
    args = make_args(tmp_path, max_steps=3, eval_strategy="no", save_steps=2)
    model = make_model()
    rec = Recorder(model)
    t = Trainer(model=model, args=args, train_dataset=TRAIN, data_collator=default_data_collator,
                optimizer_cls_and_kwargs=kw, callbacks=[rec])
    run_quietly_checked(t.train)
    assert int(find_mgpo(t.optimizer).global_state["step"].item()) == 3
    assert_rest_is_theta(rec, [2])
    saved = safetensors_torch.load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    for n, v in rec.rest[2].items():
        torch.testing.assert_close(saved[adapter_name(n)], v, rtol=0, atol=0, msg=n)


# ---------------------------------------------------------------------------------------------- PEFT loops
def tiny_llama(seed=0, layers=1):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def grads_f64(model64, named_thetas, ids):
    """float64 gradients of the model's loss at the given values of the named parameters (an independent forward:
    a float64 copy of the model, torch.func.functional_call)."""
    from torch.func import functional_call

    params = {n: t.detach().double().clone().requires_grad_(True) for n, t in named_thetas.items()}
    loss = functional_call(model64, params, (), dict(input_ids=ids, labels=ids)).loss
    return list(torch.autograd.grad(loss, list(params.values())))


def test_adalora_pruning_between_steps_acts_on_theta():
    """AdaLoRA's documented loop: ``opt.step(); model.base_model.update_and_allocate(i); opt.zero_grad()``.  The
    rank allocator zeroes lora_E entries between steps; those entries are exactly 0 at rest, the next forward sees
    0 + eps there, and the whole run equals a float64 MGPO reference whose theta gets the same pruning."""
    import copy

    from f64_reference import F64MGPO

    acfg = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, lora_alpha=8,
                              lora_dropout=0.0, target_modules=["q_proj", "v_proj"], orth_reg_weight=0.1)
    model = peft.get_peft_model(tiny_llama(), acfg)
    named = lora_params(model)
    assert any("lora_E" in n for n in named)
    hp = dict(lr=1e-2, rho=0.05, ema_beta=0.9, weight_decay=0.01)
    opt = MGPO(list(named.values()), backend=BACKEND, **hp)
    ref = F64MGPO(list(named.values()), **hp)
    model64 = copy.deepcopy(model).double()
    seen = {}
    model.register_forward_pre_hook(lambda mod, args: seen.update(clone_params(model)) if mod.training else None)
    g = torch.Generator().manual_seed(5)
    pruned_any = False
    for i in range(8):
        ids = torch.randint(0, VOCAB, (4, SEQ), generator=g)
        seen.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        perturbed = dict(zip(named, ref.perturbed()))
        for n, t in seen.items():  # the forward saw the reference's theta + eps (pruned entries: exactly eps)
            torch.testing.assert_close(t.double(), perturbed[n], rtol=1e-4, atol=1e-7, msg=f"forward {i} {n}")
        ref.step(grads_f64(model64, perturbed, ids))
        opt.step()
        model.base_model.update_and_allocate(i)
        # at rest, before the next forward: the allocator's zeros are in the parameters, exactly
        for k, (n, p) in enumerate(named.items()):
            if "lora_E" not in n:
                continue
            mask = p.detach() == 0
            if bool(mask.any()):
                pruned_any = True
                eps = opt.global_state["coef"] * opt.state[p]["exp_avg"]
                assert float(eps[mask].abs().min()) > 1e-6, "eps on the pruned entries would be visible"
                ref.theta[k][mask] = 0.0  # the same pruning, on the reference's theta
        for k, (n, p) in enumerate(named.items()):
            torch.testing.assert_close(p.detach().double(), ref.theta[k], rtol=1e-4, atol=1e-7, msg=f"step {i} {n}")
        opt.zero_grad()
    assert pruned_any and not opt.perturbation_applied
    ranks = [int((p != 0).sum()) for n, p in named.items() if "lora_E" in n]
    assert sum(ranks) < 4 * len(ranks), ranks  # the budget shrank


@pytest.mark.parametrize("save_after", [2, 3])
def test_set_adapter_switching_then_torch_save_resume_equals_uninterrupted(tmp_path, save_after):
    """Two LoRA adapters, MGPO over both; the later-listed adapter ("second") trains first, so a later parameter gets
    its first gradient before an earlier one; model and optimizer state dicts saved with torch.save at rest after
    step ``save_after`` (2: only "second" has state; 3: "default" has just had its first gradient), loaded into fresh
    objects, and continued (switching adapters again) equal the uninterrupted run."""
    lcfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                init_lora_weights="gaussian")
    schedule = ["second"] * 3 + ["default"] * 3 + ["second"] * 2  # the adapter trained at each step

    def build():
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**lcfg))
        model.add_adapter("second", peft.LoraConfig(**lcfg))
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.02)
        named = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert list(named)[0].endswith(".default.weight") and any(n.endswith(".second.weight") for n in named)
        return model, named, MGPO(list(named.values()), lr=1e-2, rho=0.05, ema_beta=0.9, backend=BACKEND)

    def train(model, named, opt, steps, save_after=None):
        for i in steps:
            model.set_adapter(schedule[i])
            ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(100 + i))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i == save_after:
                assert not opt.perturbation_applied
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
                saved_at = {n: p.detach().clone() for n, p in named.items()}
                eps = {n: opt.global_state["coef"] * opt.state[p]["exp_avg"] for n, p in named.items()
                       if p in opt.state}
                return saved_at, eps

    model, named, opt = build()
    saved_at, eps = train(model, named, opt, range(save_after + 1), save_after=save_after)
    # state: only "second" after step 2; both after step 3
    assert len(eps) == len(named) // (2 if save_after == 2 else 1)
    assert all(n.endswith(".second.weight") for n in eps) or save_after == 3
    assert max(float(e.norm() / saved_at[n].norm()) for n, e in eps.items()) > 1e-3
    train(model, named, opt, range(save_after + 1, 8))

    fresh, fnamed, fopt = build()
    with torch.no_grad():
        for p in fnamed.values():
            p.normal_()  # the weights must come from the checkpoint
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh.load_state_dict(ck["model"])
    fopt.load_state_dict(ck["opt"])
    for n, p in fnamed.items():  # the saved model state is theta
        torch.testing.assert_close(p.detach(), saved_at[n], rtol=0, atol=0, msg=n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(fresh, fnamed, fopt, range(save_after + 1, 8))
    assert not [w for w in caught if "MGPO" in str(w.message)], [str(w.message) for w in caught]
    for n, p in fnamed.items():
        q = named[n]
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-9, msg=n)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fopt.state[p][key], opt.state[q][key], rtol=1e-6, atol=1e-12, msg=n)
