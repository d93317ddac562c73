"""MGPO as DeepSpeed ZeRO's client optimizer (stages 1, 2, 3; fp32 and bf16), 2 gloo processes on the CPU,
each configuration against one process that trains the same model with MGPO on the same global batches.

What would be silently wrong without mgpo_kernels/_deepspeed.py: per-rank or per-group norms (DeepSpeed steps each
group's flat partition separately), eps written into the fp32 masters instead of the model copy the forward uses,
eps left in the model for evaluation and checkpoints, the global scalars lost across ``load_checkpoint``.

One 2-process launch trains every configuration (a module fixture); the tests read its results.  A second launch
saves a checkpoint half-way, and two fresh processes load it and finish the run.
"""
from __future__ import annotations

import datetime
import os
import socket
import traceback
import warnings

import pytest
import torch

# these tests run DeepSpeed on the CPU (gloo) even on a GPU machine: its accelerator is chosen at import
os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed", reason="deepspeed is not installed (requirements-dev.txt pins it)")

import torch.multiprocessing as mp  # noqa: E402

from mgpo_kernels import MGPO  # noqa: E402
from mgpo_kernels.integrations.common import find_mgpo  # noqa: E402
from test_zero_redundancy import Ragged  # noqa: E402

WORLD = 2
STEPS = 4
MICRO = 2  # per rank: the global batch is WORLD * MICRO rows
LR = 1e-2
KW = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, rho=0.1, ema_beta=0.8)

#: name -> (stage, dtype, groups, DeepSpeed gradient_clipping, MGPO max_grad_norm)
CONFIGS = {
    "z0-fp32-2groups": (0, "fp32", 2, 0.0, None),  # no ZeRO: MGPO holds the model's parameters, as under DDP
    "z1-fp32-2groups": (1, "fp32", 2, 0.0, None),
    "z2-fp32-2groups-dsclip": (2, "fp32", 2, 0.05, None),
    "z2-fp32-1group-mgpoclip": (2, "fp32", 1, 0.0, 0.05),
    "z3-fp32-2groups": (3, "fp32", 2, 0.0, None),
    "z3-fp32-2groups-mgpoclip": (3, "fp32", 2, 0.0, 0.05),
    "z1-bf16-2groups-dsclip": (1, "bf16", 2, 0.05, None),
    "z2-bf16-2groups": (2, "bf16", 2, 0.0, None),
    "z3-bf16-2groups": (3, "bf16", 2, 0.0, None),
    "z3-fp32-2groups-accum2": (3, "fp32", 2, 0.0, None),
}
#: gradient accumulation: the rank's rows in micro-batches of one (eps is applied once, at the first of them)
ACCUM = {"z3-fp32-2groups-accum2": 2}
#: nothing between steps (no evaluation, no gathering to record theta, which releases the parameters again): under
#: ZeRO-3, DeepSpeed then keeps the small "persistent" parameters gathered from one step to the next forward
NO_EVAL = {"z3-fp32-2groups-accum2"}


#: odd sizes (7x13, 13x5, a 1x5 row): DeepSpeed pads the partitions, and stage 3 pads per parameter
Net = Ragged


def make_net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def groups_of(model: Net, n: int):
    if n == 1:
        return [{"params": list(model.parameters())}]
    return [{"params": list(model.fc1.parameters())},
            {"params": list(model.fc2.parameters()) + [model.row], "lr": 4 * LR}]  # LoRA+-like second group


def batch(step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * MICRO, 7, generator=g)
    y = torch.randn(WORLD * MICRO, 5, generator=g)
    return x.to(dtype), y.to(dtype)


def loss_fn(out, y):
    return (out.float() - y.float()).square().mean()


def ds_config(stage, dtype, clip, accum=1):
    return {"train_micro_batch_size_per_gpu": MICRO // accum, "gradient_accumulation_steps": accum,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": clip, "bf16": {"enabled": dtype == "bf16"}, "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False}


def full_params(engine, stage):
    """The model's parameters on every rank (gathered under stage 3), fp32 copies."""
    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed.ops

    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op at start (~100 s), used only to speed up
    # inference collectives: not needed here
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))


def _finish():
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def spawn(fn, *args):
    mp.start_processes(fn, args=(free_port(),) + args, nprocs=WORLD, join=True, start_method="spawn")


def train_ds(rank, name, steps=STEPS, start=0, engine=None):
    """Train configuration ``name`` on this rank's rows; returns (engine, per-step records)."""
    stage, dtype, ngroups, clip, mgn = CONFIGS[name]
    accum = ACCUM.get(name, 1)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    if engine is None:
        model = make_net()
        opt = MGPO(groups_of(model, ngroups), lr=LR, max_grad_norm=mgn, **KW)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                               config=ds_config(stage, dtype, clip, accum))
    per = MICRO // accum
    records = []
    for t in range(start, start + steps):
        x, y = batch(t, torch_dtype)
        engine.train()
        losses = []
        for k in range(accum):  # DeepSpeed steps at the last micro-batch only
            rows = slice(rank * MICRO + k * per, rank * MICRO + (k + 1) * per)
            loss = loss_fn(engine(x[rows]), y[rows])
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        loss = torch.stack(losses).mean()
        eval_loss = torch.tensor(float("nan"))
        if name not in NO_EVAL:
            engine.eval()
            with torch.no_grad():  # the evaluation DeepSpeed users run between steps: theta
                x_all, y_all = batch(t, torch_dtype)
                eval_loss = loss_fn(engine(x_all), y_all)
        if name in NO_EVAL and t != start + steps - 1:
            continue
        records.append({"loss": loss.detach().float().clone(), "eval": eval_loss.float().clone(),
                        "theta": full_params(engine, stage)})
    return engine, records


def _configs_worker(rank, port, out):
    _init(rank, port)
    try:
        results = {}
        for name in CONFIGS:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine, records = train_ds(rank, name)
            mgpo = find_mgpo(engine.optimizer)
            results[name] = {"records": records, "steps": float(mgpo.global_state["step"]),
                             "applied_after_eval": mgpo.perturbation_applied,
                             "mgpo_warnings": [str(w.message) for w in caught if "MGPO" in str(w.message)]}
        results["accelerate"] = _accelerate_run(rank)
        torch.save(results, os.path.join(out, f"configs{rank}.pt"))
        _finish()
    except BaseException:
        traceback.print_exc()
        raise


def _accelerate_run(rank):
    """accelerate's DeepSpeed plugin (ZeRO-2, two groups) in a plain loop: Accelerator.prepare(model, MGPO)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=ds_config(2, "fp32", 0.0))
    acc = Accelerator(deepspeed_plugin=plugin, cpu=True)
    model = make_net()
    opt = MGPO(groups_of(model, 2), lr=LR, **KW)
    model, opt = acc.prepare(model, opt)
    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    for t in range(STEPS):
        x, y = batch(t)
        model.train()
        acc.backward(loss_fn(model(x[rows]), y[rows]))
        opt.step()
        opt.zero_grad()
    return [p.detach().float().clone() for p in model.parameters()]


def reference(name, steps=STEPS):
    """One process, the global batch, plain MGPO (max_grad_norm = DeepSpeed's gradient_clipping when that is set;
    both use torch's clip_grad_norm_ formula)."""
    stage, dtype, ngroups, clip, mgn = CONFIGS[name]
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = make_net(torch_dtype)
    opt = MGPO(groups_of(model, ngroups), lr=LR, max_grad_norm=mgn if mgn is not None else (clip or None), **KW)
    records = []
    for t in range(steps):
        x, y = batch(t, torch_dtype)
        model.train()
        # the mean of the ranks' losses, as DeepSpeed averages their gradients
        loss = sum(loss_fn(model(x[r * MICRO:(r + 1) * MICRO]), y[r * MICRO:(r + 1) * MICRO])
                   for r in range(WORLD)) / WORLD
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            eval_loss = loss_fn(model(x), y)
        records.append({"loss": loss.detach().float(), "eval": eval_loss.float(),
                        "theta": [p.detach().float().clone() for p in model.parameters()]})
    return records


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    spawn(_configs_worker, str(out))
    return [torch.load(os.path.join(out, f"configs{r}.pt")) for r in range(WORLD)]


def _tol(name):
    # fp32: the same arithmetic up to the order of the sums (rank partitions, gloo's all-reduce): 1e-5 relative
    # (measured: <= 3e-7 relative).  bf16: the model copy is compared (what the forward uses); each rank runs its
    # forward/backward in bf16 on half the batch and the gradients are averaged over the ranks, where one process
    # sums the whole batch, so the fp32 masters may differ by rounding and a weight may land one bf16 step (2^-8
    # relative) away.  Measured here: identical.
    return (1e-5, 1e-6) if CONFIGS[name][1] == "fp32" else (2 ** -8, 1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_equals_one_process(ds_results, name):
    ref = reference(name)
    rtol, atol = _tol(name)
    for rank, res in enumerate(ds_results):
        got = res[name]
        assert got["steps"] == STEPS
        assert not got["applied_after_eval"]
        assert not got["mgpo_warnings"]  # e.g. a "no training forward applied the perturbation" between groups
        for t, (g, r) in enumerate(zip(got["records"], ref[-len(got["records"]):])):
            for a, b in zip(g["theta"], r["theta"]):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol,
                                           msg=lambda m: f"{name} rank {rank} step {t}: theta differs: {m}")
            # the training loss was taken at theta + eps (the same eps as one process), the evaluation at theta
            if name not in NO_EVAL:
                torch.testing.assert_close(g["eval"], r["eval"], rtol=max(rtol, 1e-5) * 10, atol=atol)
        losses = torch.stack([res[name]["records"][-1]["loss"] for res in ds_results]).mean()
        torch.testing.assert_close(losses, ref[-1]["loss"], rtol=max(rtol, 1e-5) * 10, atol=atol)


# ------------------------------------------------------------------------------- checkpoints in fresh processes
RESUME = ("z2-bf16-2groups", "z3-fp32-2groups")
HALF = STEPS // 2


def _save_worker(rank, port, out):
    """Train HALF steps, save_checkpoint, finish the run (the uninterrupted reference); also check the refusals."""
    _init(rank, port)
    try:
        results = {}
        for name in RESUME:
            engine, _ = train_ds(rank, name, steps=HALF)
            engine.save_checkpoint(os.path.join(out, name), tag="half")
            saved_theta = full_params(engine, CONFIGS[name][0])
            _, rest = train_ds(rank, name, steps=STEPS - HALF, start=HALF, engine=engine)
            results[name] = {"final": rest[-1]["theta"], "saved_theta": saved_theta}
        results["refusals"] = _refusals()
        results["refusals"]["universal_checkpoint"] = _state_without_scalars(rank)
        torch.save(results, os.path.join(out, f"save{rank}.pt"))
        _finish()
    except BaseException:
        traceback.print_exc()
        raise


def _load_worker(rank, port, out):
    _init(rank, port)
    try:
        results = {}
        for name in RESUME:
            stage, dtype, ngroups, clip, mgn = CONFIGS[name]
            model = make_net()
            torch.manual_seed(1234)  # a different init: the checkpoint must overwrite it
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            opt = MGPO(groups_of(model, ngroups), lr=LR, max_grad_norm=mgn, **KW)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, dtype, clip))
            engine.load_checkpoint(os.path.join(out, name), tag="half")
            loaded = full_params(engine, stage)
            _, rest = train_ds(rank, name, steps=STEPS - HALF, start=HALF, engine=engine)
            results[name] = {"final": rest[-1]["theta"], "loaded": loaded,
                             "state": {k: float(v) for k, v in opt.global_state.items()}}
        torch.save(results, os.path.join(out, f"load{rank}.pt"))
        _finish()
    except BaseException:
        traceback.print_exc()
        raise


def _state_without_scalars(rank):
    """Moments loaded without MGPO's global scalars (what a universal checkpoint load leaves): the first step of a
    fresh link refuses it instead of restarting gbar and eps."""
    engine, _ = train_ds(rank, "z2-fp32-2groups-dsclip", steps=1)
    mgpo = find_mgpo(engine.optimizer)
    for v in mgpo._gstate.tensors().values():  # as if only the per-tensor state had been restored
        v.zero_()
    del mgpo.__dict__["_deepspeed"]
    try:
        train_ds(rank, "z2-fp32-2groups-dsclip", steps=1, start=1, engine=engine)
    except RuntimeError as e:
        return str(e)
    return None


def _refusals():
    """Configurations MGPO cannot serve: the first step raises, naming the setting."""
    msgs = {}
    cases = {
        "offload": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                    "zero_force_ds_cpu_optimizer": False},
        "elastic_checkpoint": {"zero_optimization": {"stage": 2, "elastic_checkpoint": True}},
        "stage 0": {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}},
    }
    for what, extra in cases.items():
        model = make_net()
        opt = MGPO(model.parameters(), lr=LR, **KW)
        cfg = ds_config(2, "fp32", 0.0)
        cfg.update(extra)
        msgs[what] = None
        try:  # at deepspeed.initialize (the stage-0 wrappers step once there) or at the first step
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            x, y = batch(0, torch.bfloat16 if cfg["bf16"]["enabled"] else torch.float32)
            engine.backward(loss_fn(engine(x[:MICRO]), y[:MICRO]))
            engine.step()
        except NotImplementedError as e:
            msgs[what] = str(e)
    return msgs


@pytest.fixture(scope="module")
def ds_resume(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_ckpt")
    spawn(_save_worker, str(out))
    spawn(_load_worker, str(out))  # fresh processes
    return ([torch.load(os.path.join(out, f"save{r}.pt")) for r in range(WORLD)],
            [torch.load(os.path.join(out, f"load{r}.pt")) for r in range(WORLD)])


@pytest.mark.parametrize("name", RESUME)
def test_load_checkpoint_in_fresh_processes_continues_the_run(ds_resume, name):
    saved, loaded = ds_resume
    half_ref = reference(name, steps=HALF)[-1]["theta"]
    rtol, atol = _tol(name)
    for rank in range(WORLD):
        # what the checkpoint holds and what a load restores is theta, not theta + eps
        for a, b in zip(saved[rank][name]["saved_theta"], half_ref):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        for a, b in zip(loaded[rank][name]["loaded"], saved[rank][name]["saved_theta"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert loaded[rank][name]["state"]["step"] == STEPS
        # resumed == uninterrupted, bit for bit (same ranks, same arithmetic)
        for a, b in zip(loaded[rank][name]["final"], saved[rank][name]["final"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unsupported_configurations_are_refused(ds_resume):
    saved, _ = ds_resume
    for rank in range(WORLD):
        for what, msg in saved[rank]["refusals"].items():
            assert msg is not None and what in msg, (what, msg)


# ------------------------------------------------------------------------------------ the Hugging Face Trainer
TRAINER_STEPS = 4
TRAINER_KW = dict(lr=3e-3, rho=0.05, ema_beta=0.9, loraplus_lr_ratio=4.0)


def trainer_args(out, per_device, ds, stage=2):
    from transformers import TrainingArguments

    cfg = None
    if ds:
        cfg = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
               "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
               "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
               "bf16": {"enabled": False}, "steps_per_print": 10 ** 9}
    return TrainingArguments(output_dir=out, per_device_train_batch_size=per_device, max_steps=TRAINER_STEPS,
                             lr_scheduler_type="constant", max_grad_norm=0.5, use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", seed=0, deepspeed=cfg,
                             dataloader_num_workers=0, disable_tqdm=True)


def lora_weights(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def _trainer_worker(rank, port, out, stage):
    _init(rank, port)
    try:
        from test_hf_trainer import EVAL, TRAIN, make_model
        from transformers import Trainer

        from mgpo_kernels.integrations.hf import MGPOCallback, mgpo_optimizer_cls_and_kwargs

        model = make_model()
        trainer = Trainer(model=model, args=trainer_args(os.path.join(out, "t"), 2, True, stage), train_dataset=TRAIN,
                          optimizer_cls_and_kwargs=mgpo_optimizer_cls_and_kwargs(**TRAINER_KW),
                          callbacks=[MGPOCallback()])
        trainer.train()
        mgpo = trainer.optimizer.optimizer
        while not isinstance(mgpo, MGPO):
            mgpo = mgpo.optimizer
        eval_loss = trainer.evaluate(EVAL)["eval_loss"]
        trainer.save_model(os.path.join(out, "saved"))  # rank 0 writes the adapter
        params = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
        if stage == 3:
            with deepspeed.zero.GatheredParameters(params):
                lora = lora_weights(trainer.model)
        else:
            lora = lora_weights(trainer.model)
        result = {"lora": lora, "steps": float(mgpo.global_state["step"]), "eval": eval_loss, "dropped": None}
        if stage == 3:
            torch.save(result, os.path.join(out, f"trainer{rank}.pt"))
            _finish()
            return
        # optimizers=(MGPO(...), None) under DeepSpeed: transformers drops it; MGPOCallback says so
        model = make_model()
        from mgpo_kernels.integrations.hf import mgpo_for_peft

        kw = dict(TRAINER_KW)
        opt = mgpo_for_peft(model, **kw)
        trainer = Trainer(model=model, args=trainer_args(os.path.join(out, "d"), 2, True), train_dataset=TRAIN,
                          optimizers=(opt, None), callbacks=[MGPOCallback()])
        try:
            trainer.train()
            result["dropped"] = None
        except Exception as e:  # noqa: BLE001 - the message is the result
            result["dropped"] = f"{type(e).__name__}: {e}"
        torch.save(result, os.path.join(out, f"trainer{rank}.pt"))
        _finish()
    except BaseException:
        traceback.print_exc()
        raise


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("stage", [2, 3])
def test_hf_trainer_with_deepspeed_equals_one_process(tmp_path, stage):
    """Trainer(deepspeed=ZeRO-2 or ZeRO-3 config, optimizer_cls_and_kwargs=MGPO with LoRA+ groups) on 2 ranks of 2 rows
    equals the Trainer without DeepSpeed on one process of 4 rows (its clipping = DeepSpeed's gradient_clipping):
    the weights, the evaluation (at theta) and the adapter save_model() writes (theta)."""
    from safetensors.torch import load_file
    from test_hf_trainer import EVAL, TRAIN, make_model
    from transformers import Trainer

    from mgpo_kernels.integrations.hf import mgpo_optimizer_cls_and_kwargs

    spawn(_trainer_worker, str(tmp_path), stage)
    got = [torch.load(os.path.join(tmp_path, f"trainer{r}.pt")) for r in range(WORLD)]
    model = make_model()
    ref_trainer = Trainer(model=model, args=trainer_args(str(tmp_path / "ref"), 2 * WORLD, False),
                          train_dataset=TRAIN, optimizer_cls_and_kwargs=mgpo_optimizer_cls_and_kwargs(**TRAINER_KW))
    ref_trainer.train()
    ref = lora_weights(model)
    ref_eval = ref_trainer.evaluate(EVAL)["eval_loss"]
    saved = load_file(os.path.join(tmp_path, "saved", "adapter_model.safetensors"))
    assert len(saved) == len(ref)
    for n, v in saved.items():
        torch.testing.assert_close(v.float(), ref[n.replace(".weight", ".default.weight")], rtol=1e-5, atol=1e-6)
    for rank in range(WORLD):
        assert got[rank]["steps"] == TRAINER_STEPS
        assert got[rank]["lora"].keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(got[rank]["lora"][n], ref[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
        assert got[rank]["eval"] == pytest.approx(ref_eval, rel=1e-5)
        if stage == 2:  # optimizers=(MGPO, None), dropped by transformers, is reported (once is enough)
            assert got[rank]["dropped"] is not None and "optimizer_cls_and_kwargs" in got[rank]["dropped"], \
                got[rank]["dropped"]


def test_accelerate_deepspeed_plugin_equals_one_process(ds_results):
    ref = reference("z1-fp32-2groups")[-1]["theta"]  # the same model, groups and batches (the stage is DeepSpeed's)
    for res in ds_results:
        for a, b in zip(res["accelerate"], ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpuinfo_serves_deepspeed_and_pytest_benchmark():
    """deepspeed needs py-cpuinfo and pytest-benchmark py-cpuinfo2: both install a top-level ``cpuinfo`` package,
    so whichever pip wrote last is the one both import; it must serve both."""
    import cpuinfo

    assert isinstance(cpuinfo.get_cpu_info(), dict)
    pytest.importorskip("pytest_benchmark.plugin")
    from deepspeed.ops.op_builder.builder import OpBuilder  # noqa: F401 - imports cpuinfo at module level
