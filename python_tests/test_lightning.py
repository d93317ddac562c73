"""MGPO under PyTorch Lightning 2.x with ``MGPOCallback`` (real Trainer, CPU, tiny MLP, a few steps).

Theta at rest: a probe callback snapshots the parameters right after every optimizer step; they are theta by
definition when the next training forward sees them plus eps = coef * m (checked).  MGPOCallback only checks the
setup.  Checks: validation / sanity check / test / predict see theta and move nothing; every
checkpoint (ModelCheckpoint full and weights-only, trainer.save_checkpoint) holds theta; the model holds theta after
fit; fit(ckpt_path=...) in fresh objects ends where the uninterrupted run ends (weights and moments, 1e-6 relative)
under precision 32 / bf16-mixed / 16-mixed (GradScaler) / bf16-true and gradient accumulation; gradient accumulation
equals a plain PyTorch loop; settings that cannot work are refused with a message naming the fix; the warning when
MGPO holds none or part of the trainable parameters; ``self.optimizers().eval()`` inside the module; weight
averaging (EMAWeightAveraging, StochasticWeightAveraging) averages theta.
"""
from __future__ import annotations

import glob
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from mgpo_kernels import MGPO  # noqa: E402
from mgpo_kernels.integrations.common import find_mgpo  # noqa: E402
from mgpo_kernels.integrations.lightning import MGPOCallback  # noqa: E402

# a step in eval mode (plain AdamW) or a load that cannot tell what the model holds would be a silent error here
pytestmark = [pytest.mark.filterwarnings(r"error:MGPO\.step\(\) was called in eval mode"),
              pytest.mark.filterwarnings(r"error:MGPO\.load_state_dict")]
KW = dict(lr=1e-2, rho=0.05, ema_beta=0.9, backend="reference")  # the callback is backend-agnostic
TOL = 1e-6


def snapshot(module):
    return [p.detach().float().clone() for p in module.parameters()]


def max_rel(a, b):
    return max(((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item() for x, y in zip(a, b))


def make_net(pl):
    class Net(pl.LightningModule):
        """Records what the parameters hold (and MGPO's mode) in every validation/test/predict step."""

        def __init__(self, opt_fn=None, user_eval=False):
            super().__init__()
            torch.manual_seed(0)  # the same initial weights in every run of a test
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            self.opt_fn = opt_fn or (lambda module: MGPO(module.parameters(), **KW))
            self.user_eval = user_eval
            self.records = []

        def _loss(self, batch):
            x, y = batch
            return F.mse_loss(self.net(x).float(), y.float())

        def training_step(self, batch, batch_idx):
            return self._loss(batch)

        def _record(self, kind):
            m = find_mgpo(self.trainer.optimizers[0]) if self.trainer.optimizers else None
            self.records.append(dict(kind=kind, sanity=self.trainer.sanity_checking, step=self.trainer.global_step,
                                     params=snapshot(self), training=None if m is None else m.training))

        def validation_step(self, batch, batch_idx):
            self._record("val")
            return self._loss(batch)

        def test_step(self, batch, batch_idx):
            self._record("test")
            return self._loss(batch)

        def predict_step(self, batch, batch_idx):
            self._record("predict")
            return self.net(batch[0])

        def on_validation_epoch_start(self):
            if self.user_eval:  # through Lightning's LightningOptimizer wrapper
                self.optimizers().eval()

        def on_validation_epoch_end(self):
            if self.user_eval:
                self.optimizers().train()

        def configure_optimizers(self):
            return self.opt_fn(self)

    return Net


def make_probe(pl):
    class ThetaProbe(pl.Callback):
        """What the parameters hold right after every optimizer step (``theta``, keyed by global_step: the first
        on_train_batch_end at rest after a step), eps = coef * m there, and what the first training forward after
        that step sees (``forward``; module forward pre-hooks run after MGPO's global hook): by definition theta + eps,
        so :func:`assert_theta_by_forward` proves the snapshots are theta.  Optionally saves a checkpoint at given
        batches."""

        def __init__(self, save_at=(), dirpath=None, weights_only=False):
            self.theta, self.save_at, self.dirpath, self.weights_only = {}, set(save_at), dirpath, weights_only
            self.eps, self.forward, self.pending, self.module, self.handles = {}, {}, None, None, []

        def on_fit_start(self, trainer, pl_module):
            self.module = pl_module
            self.handles = [m.register_forward_pre_hook(self._pre_forward) for m in pl_module.modules()]

        def on_fit_end(self, trainer, pl_module):
            for h in self.handles:
                h.remove()

        def _pre_forward(self, module, args):
            if self.pending is not None and module.training and torch.is_grad_enabled():
                self.forward[self.pending] = snapshot(self.module)
                self.pending = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = trainer.global_step
            m = find_mgpo(trainer.optimizers[0])
            if s not in self.theta and not m.perturbation_applied:  # applied: a micro-batch within a step
                self.theta[s] = snapshot(pl_module)
                coef = m.global_state["coef"]
                self.eps[s] = [(coef * m.state[p]["exp_avg"]).float() if "exp_avg" in m.state.get(p, {})
                               else torch.zeros_like(p, dtype=torch.float32) for p in pl_module.parameters()]
                self.pending = s if s > 0 else None
            if trainer.fit_loop.total_batch_idx in self.save_at:
                name = f"manual-batch{trainer.fit_loop.total_batch_idx}.ckpt"
                trainer.save_checkpoint(os.path.join(self.dirpath, name), weights_only=self.weights_only)

        def on_train_end(self, trainer, pl_module):
            self.at_train_end = snapshot(pl_module)  # what callbacks after this one see at the end of training

    return ThetaProbe


def assert_theta_by_forward(probe, min_eps=1e-3):
    """probe.theta[s] is theta_s: the next training forward saw theta_s + eps_s; eps is not negligible there, so the
    checks against probe.theta tell theta from theta + eps."""
    assert probe.forward
    for s, seen in probe.forward.items():
        expected = [t + e for t, e in zip(probe.theta[s], probe.eps[s])]
        assert max_rel(seen, expected) < TOL, s
        assert max_rel(expected, probe.theta[s]) > min_eps, s


Net, ThetaProbe = make_net(L), make_probe(L)


def loaders(n=16, batch=4):
    x, y = torch.randn(n, 8), torch.randn(n, 1)
    return lambda: DataLoader(TensorDataset(x, y), batch_size=batch)


def make_trainer(tmp_path, pl=L, callbacks=(), **kw):
    callbacks = list(callbacks)
    args = dict(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False, enable_model_summary=False,
                default_root_dir=str(tmp_path), limit_val_batches=1, num_sanity_val_steps=0,
                enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks))
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


def mgpo_of(trainer):
    return find_mgpo(trainer.optimizers[0])


def moments(trainer):
    m = mgpo_of(trainer)
    st = [m.state[p] for g in m.param_groups for p in g["params"]]
    return [s["exp_avg"] for s in st] + [s["exp_avg_sq"] for s in st] + [s["master_param"] for s in st if
                                                                         "master_param" in s]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers|LeafSpec|litlogger).*")
        torch.set_num_threads(1)
        yield


# ---------------------------------------------------------------------------------------------------------------
def test_callback_subclasses_every_installed_callback_base():
    assert isinstance(MGPOCallback(), L.Callback)
    pl = pytest.importorskip("pytorch_lightning")
    assert isinstance(MGPOCallback(), pl.Callback)


@pytest.mark.parametrize("callback", [True, False])
def test_validation_test_predict_at_theta_and_mode_restored(tmp_path, callback):
    dl = loaders()
    model, probe = Net(), ThetaProbe()
    trainer = make_trainer(tmp_path, callbacks=([MGPOCallback()] if callback else []) + [probe], max_steps=6,
                           val_check_interval=2)
    trainer.fit(model, dl(), dl())
    assert sorted(probe.theta) == [1, 2, 3, 4, 5, 6] and sorted(probe.forward) == [1, 2, 3, 4, 5]
    assert_theta_by_forward(probe)
    vals = [r for r in model.records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2, 4, 6]
    for r in vals:
        assert max_rel(r["params"], probe.theta[r["step"]]) < TOL, r["step"]
        assert r["training"] is True  # nothing switches MGPO's mode: validation needs no eval()
    mgpo = mgpo_of(trainer)
    assert max_rel(snapshot(model), probe.theta[6]) < TOL  # the model holds theta after fit
    assert max_rel(probe.at_train_end, probe.theta[6]) < TOL
    assert mgpo.training and not mgpo.perturbation_applied
    perturbed = [t + e for t, e in zip(probe.theta[6], probe.eps[6])]
    assert max_rel(perturbed, probe.theta[6]) > 1e-3  # eps_6 (due at the next training forward) is not negligible

    # train() moves nothing; standalone loops see theta and move nothing (their eval-mode forwards apply nothing)
    mgpo.train()
    assert max_rel(snapshot(model), probe.theta[6]) == 0
    model.records.clear()
    trainer.validate(model, dl(), verbose=False)
    trainer.test(model, dl(), verbose=False)
    trainer.predict(model, dl())
    make_trainer(tmp_path, callbacks=[MGPOCallback()] if callback else []).validate(model, dl(), verbose=False)
    assert [r["kind"] for r in model.records] == ["val", "test", "test", "test", "test"] + ["predict"] * 4 + ["val"]
    for r in model.records:
        assert max_rel(r["params"], probe.theta[6]) < TOL, r["kind"]
    assert mgpo.training and not mgpo.perturbation_applied
    assert max_rel(snapshot(model), probe.theta[6]) == 0
    # the next training forward still applies eps_6
    model.train()
    model._loss(next(iter(dl())))
    assert mgpo.perturbation_applied
    assert max_rel(snapshot(model), perturbed) < TOL


def test_fit_stopped_by_an_exception_leaves_theta(tmp_path):
    class Boom(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                raise RuntimeError("boom")

    model, probe = Net(), ThetaProbe()
    trainer = make_trainer(tmp_path, callbacks=[MGPOCallback(), probe, Boom()], max_steps=6)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, loaders()())
    assert max_rel(snapshot(model), probe.theta[3]) < TOL


@pytest.mark.parametrize("weights_only", [False, True])
def test_checkpoints_hold_theta(tmp_path, weights_only):
    dl = loaders()
    ckpt = L.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "mc"), filename="{step}", every_n_train_steps=2,
                                       save_top_k=-1, save_weights_only=weights_only)
    model, probe = Net(), ThetaProbe(save_at={2, 5}, dirpath=str(tmp_path), weights_only=weights_only)
    trainer = make_trainer(tmp_path, callbacks=[MGPOCallback(), probe, ckpt], max_steps=6)
    trainer.fit(model, dl())
    trainer.save_checkpoint(str(tmp_path / "after-fit.ckpt"), weights_only=weights_only)
    assert_theta_by_forward(probe)  # probe.theta is theta, and eps is not negligible
    files = sorted(glob.glob(str(tmp_path / "mc" / "*.ckpt"))) + sorted(glob.glob(str(tmp_path / "*.ckpt")))
    assert len(files) == 3 + 2 + 1
    names = [n for n, _ in model.named_parameters()]
    for f in files:
        ck = torch.load(f, map_location="cpu", weights_only=False)
        assert ("optimizer_states" in ck) == (not weights_only)
        saved = [ck["state_dict"][n] for n in names]
        assert max_rel(saved, probe.theta[ck["global_step"]]) < TOL, f
    # the run went on at theta + eps after each mid-training save: the steps after it are MGPO steps
    assert max_rel(snapshot(model), probe.theta[6]) < TOL


def _resume_pair(tmp_path, trainer_kw, net_kw=None, epochs=4):
    """Run A uninterrupted (checkpoint each epoch); run B in fresh objects from A's epoch-1 checkpoint."""
    dl = loaders()
    net_kw = net_kw or {}

    def run(name, ckpt_path=None):
        ckpt = L.callbacks.ModelCheckpoint(dirpath=str(tmp_path / name), filename="{epoch}", save_top_k=-1)
        model, probe = Net(**net_kw), ThetaProbe()
        trainer = make_trainer(tmp_path, callbacks=[MGPOCallback(), probe, ckpt], max_epochs=epochs,
                               num_sanity_val_steps=1, **trainer_kw)
        trainer.fit(model, dl(), dl(), ckpt_path=ckpt_path)
        return model, probe, trainer

    a = run("a")
    b = run("b", ckpt_path=str(tmp_path / "a" / "epoch=1.ckpt"))
    return a, b


RESUME_CASES = {
    "32": dict(precision="32"),
    "32-accumulate2": dict(precision="32", accumulate_grad_batches=2),
    "bf16-mixed-accumulate2": dict(precision="bf16-mixed", accumulate_grad_batches=2),
    "16-mixed": "16-mixed",  # a GradScaler; Lightning maps precision="16-mixed" to bf16 on CPU, the plugin does not
    "bf16-true": dict(precision="bf16-true"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_equals_uninterrupted(tmp_path, case):
    kw = RESUME_CASES[case]
    if kw == "16-mixed":
        from lightning.pytorch.plugins.precision import MixedPrecision

        kw = dict(plugins=[MixedPrecision("16-mixed", "cpu")])
    (ma, pa, ta), (mb, pb, tb) = _resume_pair(tmp_path, kw)
    final = ta.global_step
    assert tb.global_step == final and final >= 4
    assert max_rel(snapshot(ma), pa.theta[final]) < TOL  # theta after fit
    assert max_rel(snapshot(mb), snapshot(ma)) < TOL
    assert max_rel(moments(tb), moments(ta)) < TOL
    # B's sanity check ran at the checkpoint's theta, and B's first steps continued from theta + eps
    sanity = [r for r in mb.records if r["sanity"]]
    resume_step = final // 2
    assert len(sanity) == 1 and sanity[0]["step"] == resume_step
    assert max_rel(sanity[0]["params"], pa.theta[resume_step]) < TOL
    for s, theta in pb.theta.items():
        assert max_rel(theta, pa.theta[s]) < TOL, s
    if case == "16-mixed":
        assert tb.precision_plugin.scaler.get_scale() == ta.precision_plugin.scaler.get_scale()


def test_fit_resumed_from_its_last_checkpoint_leaves_theta(tmp_path):
    """The fit loop is skipped (max_epochs already reached); loading the optimizer state re-applied eps."""
    dl = loaders()
    ckpt = L.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "a"), filename="last", save_top_k=-1)
    model, probe = Net(), ThetaProbe()
    make_trainer(tmp_path, callbacks=[MGPOCallback(), probe, ckpt], max_epochs=2).fit(model, dl())
    again = Net()
    make_trainer(tmp_path, callbacks=[MGPOCallback()], max_epochs=2).fit(again, dl(),
                                                                         ckpt_path=str(tmp_path / "a" / "last.ckpt"))
    assert max_rel(snapshot(again), probe.theta[8]) < TOL


def test_accumulation_equals_plain_loop_with_mid_accumulation_save(tmp_path):
    """The micro-batches after a checkpoint saved between two micro-batches are at theta + eps again."""
    dl = loaders(n=24)
    model, probe = Net(), ThetaProbe(save_at={2, 6}, dirpath=str(tmp_path))  # batch 2, 6: first micro-batch of a step
    trainer = make_trainer(tmp_path, callbacks=[MGPOCallback(), probe], max_epochs=1, accumulate_grad_batches=3)
    trainer.fit(model, dl())
    assert trainer.global_step == 2

    ref = Net()
    opt = MGPO(ref.parameters(), **KW)
    for i, batch in enumerate(dl()):
        (ref._loss(batch) / 3).backward()
        if i % 3 == 2:
            opt.step()
            opt.zero_grad()
    opt.eval()
    assert max_rel(snapshot(model), snapshot(ref)) < TOL


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gradient_clip_val_under_mixed_precision_is_refused(tmp_path, precision):
    from lightning.pytorch.plugins.precision import MixedPrecision

    trainer = make_trainer(tmp_path, callbacks=[MGPOCallback()], max_steps=2, gradient_clip_val=1.0,
                           plugins=[MixedPrecision(precision, "cpu")])
    with pytest.raises(ValueError, match=r"MGPO\(\.\.\., max_grad_norm=1\.0\)"):
        trainer.fit(Net(), loaders()())


def test_gradient_clip_val_under_fp32_equals_fused_clipping(tmp_path):
    dl = loaders()
    a, b, c = Net(), Net(opt_fn=lambda module: MGPO(module.parameters(), max_grad_norm=0.05, **KW)), Net()
    make_trainer(tmp_path, callbacks=[MGPOCallback()], max_steps=6, gradient_clip_val=0.05).fit(a, dl())
    make_trainer(tmp_path, callbacks=[MGPOCallback()], max_steps=6).fit(b, dl())
    make_trainer(tmp_path, callbacks=[MGPOCallback()], max_steps=6).fit(c, dl())
    assert max_rel(snapshot(a), snapshot(b)) < 2e-5
    assert max_rel(snapshot(c), snapshot(b)) > 1e-2  # clipping was active


def test_warns_when_mgpo_holds_none_or_part_of_the_trainable_parameters(tmp_path):
    part = Net(opt_fn=lambda module: MGPO(module.net[0].parameters(), **KW))
    with pytest.warns(UserWarning, match=r"holds 2 of 4 .*net\.2\.weight, net\.2\.bias"):
        make_trainer(tmp_path, callbacks=[MGPOCallback()], max_steps=1).fit(part, loaders()())

    frozen = torch.nn.Linear(2, 2).requires_grad_(False)  # built over tensors the module does not train
    none = Net(opt_fn=lambda module: MGPO(frozen.parameters(), **KW))
    with pytest.warns(UserWarning, match=r"holds none of the model's 4 trainable parameters"):
        make_trainer(tmp_path, callbacks=[MGPOCallback()], max_steps=1).fit(none, loaders()())

    with warnings.catch_warnings():
        warnings.filterwarnings("error", "the optimizer \\(MGPO\\) holds")
        make_trainer(tmp_path, callbacks=[MGPOCallback()], max_steps=1).fit(Net(), loaders()())


def test_optimizers_eval_inside_the_module_keeps_the_mode(tmp_path):
    """``self.optimizers()`` is Lightning's LightningOptimizer; eval()/train() through it must reach MGPO's mode, and
    train() must leave the next training forward applying eps: the run equals one that never switches, and differs
    from one without the perturbation (rho = 0)."""
    dl = loaders()
    runs = []
    for user_eval in (True, False):
        model, probe = Net(user_eval=user_eval), ThetaProbe()
        trainer = make_trainer(tmp_path, callbacks=[MGPOCallback(), probe], max_steps=6, val_check_interval=2)
        trainer.fit(model, dl(), dl())
        runs.append((model, probe))
        assert_theta_by_forward(probe)
        assert sorted(probe.forward) == [1, 2, 3, 4, 5]  # incl. the forwards right after validation and train()
        vals = [r for r in model.records if r["kind"] == "val"]
        assert len(vals) == 3
        for r in vals:
            assert r["training"] is (not user_eval)
            assert max_rel(r["params"], probe.theta[r["step"]]) < TOL
        assert mgpo_of(trainer).training
    (mu, pu), (mp, pp) = runs
    assert max_rel(snapshot(mu), snapshot(mp)) < TOL
    for s in pp.theta:
        assert max_rel(pu.theta[s], pp.theta[s]) < TOL, s
    plain = Net(opt_fn=lambda module: MGPO(module.parameters(), **{**KW, "rho": 0.0}))
    make_trainer(tmp_path, max_steps=6, val_check_interval=2).fit(plain, dl(), dl())
    assert max_rel(snapshot(plain), snapshot(mp)) > 1e-4


def _average(thetas, fn):
    avg = [t.clone() for t in thetas[0]]
    for k, th in enumerate(thetas[1:], start=1):
        avg = [fn(a, t, k) for a, t in zip(avg, th)]
    return avg


@pytest.mark.parametrize("callback", [True, False])
def test_ema_weight_averaging_averages_theta(tmp_path, callback):
    """EMAWeightAveraging updates its average at on_train_batch_end after every step: the average is of theta (the
    probe's snapshots), validation runs on the average, and the model gets the average at the end of fit."""
    decay = 0.5
    ema = L.callbacks.EMAWeightAveraging(decay=decay)
    dl = loaders()
    model, probe = Net(), ThetaProbe()
    trainer = make_trainer(tmp_path, callbacks=([MGPOCallback()] if callback else []) + [probe, ema], max_steps=6,
                           val_check_interval=2)
    trainer.fit(model, dl(), dl())
    assert_theta_by_forward(probe)
    ema_fn = lambda a, t, k: decay * a + (1 - decay) * t  # noqa: E731
    thetas = [probe.theta[s] for s in range(1, 7)]
    expected = {s: _average(thetas[:s], ema_fn) for s in (2, 4, 6)}
    of_perturbed = _average([[t + e for t, e in zip(probe.theta[s], probe.eps[s])] for s in range(1, 7)], ema_fn)
    assert max_rel(of_perturbed, expected[6]) > 1e-3  # the test tells an average of theta from one of theta + eps
    vals = [r for r in model.records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2, 4, 6]
    for r in vals:
        assert max_rel(r["params"], expected[r["step"]]) < TOL, r["step"]
    assert max_rel(snapshot(model), expected[6]) < TOL


def test_stochastic_weight_averaging_averages_theta(tmp_path):
    """StochasticWeightAveraging averages at on_train_epoch_start (epochs 1..3 here): the mean of theta at the end of
    epochs 0..2, which the model gets at the end of fit."""
    swa = L.callbacks.StochasticWeightAveraging(swa_lrs=5e-3, swa_epoch_start=2)
    model, probe = Net(), ThetaProbe()
    trainer = make_trainer(tmp_path, callbacks=[probe, swa], max_epochs=4)
    trainer.fit(model, loaders()())
    assert trainer.global_step == 16
    assert_theta_by_forward(probe)
    mean = lambda a, t, k: a + (t - a) / (k + 1)  # noqa: E731
    expected = _average([probe.theta[s] for s in (4, 8, 12)], mean)
    of_perturbed = _average([[t + e for t, e in zip(probe.theta[s], probe.eps[s])] for s in (4, 8, 12)], mean)
    assert max_rel(of_perturbed, expected) > 1e-3
    assert max_rel(snapshot(model), expected) < TOL


def test_pytorch_lightning_import_path(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    dl = loaders()
    model, probe = make_net(pl)(), make_probe(pl)()
    trainer = make_trainer(tmp_path, pl=pl, callbacks=[MGPOCallback(), probe], max_steps=4, val_check_interval=2)
    trainer.fit(model, dl(), dl())
    vals = [r for r in model.records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2, 4]
    for r in vals:
        assert max_rel(r["params"], probe.theta[r["step"]]) < TOL
    assert max_rel(snapshot(model), probe.theta[4]) < TOL


def test_tiny_llama_lora_checkpoint_resume_and_the_pre_peft_optimizer_trap(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mgpo_kernels.integrations.hf import mgpo_for_peft

    vocab, seq = 64, 12

    class LoraLlama(L.LightningModule):
        def __init__(self, trap=False):
            super().__init__()
            torch.manual_seed(0)
            cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=32, tie_word_embeddings=False)
            base = transformers.LlamaForCausalLM(cfg)
            self.base_params = list(base.parameters())  # what an optimizer built before get_peft_model holds
            self.model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                   target_modules="all-linear"))
            with torch.no_grad():  # LoRA starts B at 0; move it off zero so eps shows in every tensor
                for n, p in self.model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0.0, 0.02)
            self.trap = trap

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            if self.trap:
                return MGPO(self.base_params, **KW)
            return mgpo_for_peft(self.model, lr=KW["lr"], rho=0.05, backend=KW["backend"])

    ids = torch.randint(0, vocab, (16, seq))
    dl = lambda: DataLoader(TensorDataset(ids), batch_size=4)  # noqa: E731

    def run(name, ckpt_path=None):
        ckpt = L.callbacks.ModelCheckpoint(dirpath=str(tmp_path / name), filename="{epoch}", save_top_k=-1,
                                           save_weights_only=False)
        model, probe = LoraLlama(), ThetaProbe()
        trainer = make_trainer(tmp_path, callbacks=[MGPOCallback(), probe, ckpt], max_epochs=2)
        trainer.fit(model, dl(), ckpt_path=ckpt_path)
        return model, probe, trainer

    ma, pa, ta = run("a")
    mb, pb, tb = run("b", ckpt_path=str(tmp_path / "a" / "epoch=0.ckpt"))
    names = [n for n, _ in ma.named_parameters()]
    ck = torch.load(str(tmp_path / "a" / "epoch=0.ckpt"), map_location="cpu", weights_only=False)
    assert max_rel([ck["state_dict"][n] for n in names], pa.theta[4]) < TOL
    assert max_rel(snapshot(ma), pa.theta[8]) < TOL
    assert max_rel(snapshot(mb), snapshot(ma)) < TOL
    assert max_rel(moments(tb), moments(ta)) < TOL

    with pytest.warns(UserWarning, match=r"holds none of the model's 28 trainable parameters; missing: .*lora_A"):
        make_trainer(tmp_path, callbacks=[MGPOCallback()], max_steps=1).fit(LoraLlama(trap=True), dl())
