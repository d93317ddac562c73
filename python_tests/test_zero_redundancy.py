"""MGPO as the local optimizer of torch's ZeroRedundancyOptimizer (2 gloo processes on the CPU), and replicated
setups next to it, each against one process that trains the same model on the full batch.

ZeRO gives every rank's MGPO a different subset of the parameters: its norms must be the global ones (summed
over the ranks), or the first step must refuse clearly.  Per-rank norms would give results that differ from one
process by far more than rounding, silently.  Replicated ranks (DDP, or gradients averaged by hand) hold all the
parameters: their local norms are global and must not be summed again.

All scenarios and backends run in one 2-process launch (a module fixture); each test reads its result.
"""
from __future__ import annotations

import datetime
import functools
import os
import re
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mgpo_kernels import MGPO, available_backends

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
STEPS = 10
BATCH = 8
BACKENDS = available_backends("cpu")
BASE_KW = dict(lr=2e-2, betas=(0.9, 0.99), weight_decay=0.01, ema_beta=0.9)


class Ragged(nn.Module):
    """ZeRO's greedy partition (largest first) puts fc1.weight (91 elements) on rank 0 and the rest (88) on
    rank 1: the ranks hold different numbers of elements."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(7, 13)
        self.fc2 = nn.Linear(13, 5)
        self.row = nn.Parameter(0.1 * torch.randn(1, 5))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x[:, :7]))) + self.row


class Twins(nn.Module):
    """Two 7x5 matrices: ZeRO puts one on each rank, the ranks hold the same number of elements."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(0.4 * torch.randn(7, 5))
        self.b = nn.Parameter(0.4 * torch.randn(7, 5))

    def forward(self, x):
        return torch.tanh(x[:, :7] @ self.a) * (x[:, :7] @ self.b) + x[:, :5]


class Scales(nn.Module):
    """Two gains initialised to ones (as LayerNorm weights are): ZeRO puts one on each rank, and the ranks hold
    the same sizes *and* the same values at the first step, although they hold different parameters."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(7, 5)
        self.fc.requires_grad_(False)  # frozen: only the gains are trained (and sharded)
        self.g1 = nn.Parameter(torch.ones(5))
        self.g2 = nn.Parameter(torch.ones(5))

    def forward(self, x):
        h = self.fc(x[:, :7])
        return torch.tanh(h * self.g1) * self.g2 + h


class Lone(nn.Module):
    """One trainable tensor: ZeRO gives it to rank 0 and an empty parameter group to rank 1 (as a LoRA model with
    few adapter tensors gets on many ranks)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(0.4 * torch.randn(7, 5))

    def forward(self, x):
        return torch.tanh(x[:, :7] @ self.w)


MODELS = {"ragged": Ragged, "twins": Twins, "scales": Scales, "lone": Lone}

# name: (model, wrapper, MGPO kwargs beyond BASE_KW, what a clear refusal at the first step must mention, or
# None where a refusal is not acceptable)
LAYOUT = r"distributed="
SCENARIOS = {
    "zero_rho1": ("ragged", "zero", dict(rho=1.0), LAYOUT),
    "zero_rho005": ("ragged", "zero", dict(rho=0.05, max_grad_norm=1.0), LAYOUT),
    "zero_same_sizes": ("twins", "zero", dict(rho=1.0), LAYOUT),
    "zero_same_values": ("scales", "zero", dict(rho=1.0), LAYOUT),
    "zero_explicit_sharded": ("twins", "zero", dict(rho=1.0, distributed="sharded"), None),
    "zero_empty_shard": ("lone", "zero", dict(rho=1.0), r"distributed=|no parameters|empty"),
    # ZeRO's load_state_dict writes the local optimizer's state directly (MGPO.load_state_dict is not called)
    "zero_checkpoint_resume": ("ragged", "zero_resume", dict(rho=1.0), r"(?i)state|checkpoint|load"),
    # a sharded optimizer that is not ZeRO (each rank's MGPO holds a part, the owner broadcasts it after each
    # step): found by comparing the ranks' parameters, or refused where that cannot tell
    "by_hand_sharded": ("ragged", "by_hand_sharded", dict(rho=1.0), LAYOUT),
    "by_hand_sharded_same_sizes": ("twins", "by_hand_sharded", dict(rho=1.0), LAYOUT),
    "by_hand_sharded_same_values": ("scales", "by_hand_sharded", dict(rho=1.0), LAYOUT),
    "by_hand_sharded_explicit": ("twins", "by_hand_sharded", dict(rho=1.0, distributed="sharded"), None),
    "ddp_replicated": ("ragged", "ddp", dict(rho=1.0), None),
    "averaged_by_hand_replicated": ("ragged", "by_hand", dict(rho=0.05), None),
    "ddp_explicit_replicated": ("ragged", "ddp", dict(rho=1.0, distributed="replicated"), None),
}

# Triton runs under its (slow) interpreter here: the core scenarios only; the layout logic is shared by all backends
CASES = [(b, s) for b in BACKENDS for s in SCENARIOS
         if b != "triton" or s in ("zero_rho1", "zero_rho005", "ddp_replicated")]
SHARDED_CASES = [(b, s) for b, s in CASES if SCENARIOS[s][1] in ("zero", "zero_resume", "by_hand_sharded")]
SHARDED_IDS = [f"{b}-{s}" for b, s in SHARDED_CASES]
# after eval() a rank holds theta of the others' parameters too only where MGPO can know them: not by hand
EVAL_CASES = [(b, s) for b, s in CASES if SCENARIOS[s][1] != "by_hand_sharded"]
EVAL_IDS = [f"{b}-{s}" for b, s in EVAL_CASES]
CASE_IDS = [f"{b}-{s}" for b, s in CASES]


def make_model(kind):
    torch.manual_seed(0)
    return MODELS[kind]()


def make_data():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 7, generator=g), torch.randn(BATCH, 5, generator=g)) for _ in range(STEPS)]


def lr_at(t):
    return BASE_KW["lr"] * (1.0 - t / (2 * STEPS))


def train(model, opt, shard, average_grads=False, on_error=None, start=0, stop=STEPS, after_step=None):
    for t, (x, y) in enumerate(make_data()):
        if not start <= t < stop:
            continue
        for g in opt.param_groups:  # through the wrapper's param_groups, as a scheduler does
            g["lr"] = lr_at(t)
        if after_step is not None and t > start:  # sharded by hand: apply eps, then share it as after a step
            opt.apply_perturbation()
            after_step()
        F.mse_loss(model(x[shard]), y[shard]).backward()
        if average_grads:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
        before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step()
        except Exception as exc:  # noqa: BLE001 - reported to the test, which judges it
            if on_error is None:
                raise
            on_error(t - start, exc, all(torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())))
            return
        if after_step is not None:
            after_step()
        model.zero_grad(set_to_none=True)  # all of them: a by-hand shard's optimizer holds only its own


@functools.lru_cache(maxsize=None)
def single_process(backend, scenario):
    """The parameters after the run (theta at rest), then after eval() (theta)."""
    kind, _, kw, _ = SCENARIOS[scenario]
    kw = {k: v for k, v in kw.items() if k != "distributed"}
    model = make_model(kind)
    opt = MGPO([p for p in model.parameters() if p.requires_grad], backend=backend, **BASE_KW, **kw)
    train(model, opt, slice(None))
    opt.apply_perturbation()
    perturbed = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.eval()
    return perturbed, {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------- the workers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero_resume(rank, backend, kw, shard, on_error, out_dir):
    """ZeRO for half the run, a checkpoint as torch's docs describe (model state as it is, the consolidated
    optimizer state), a fresh model and optimizer loading it, the second half: (model, its local MGPO)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    half = STEPS // 2
    model = make_model("ragged")
    opt = ZeroRedundancyOptimizer(list(model.parameters()), optimizer_class=MGPO, backend=backend, **BASE_KW, **kw)
    train(DDP(model), opt, shard, stop=half)
    opt.consolidate_state_dict(to=0)
    path = os.path.join(out_dir, f"ckpt_{backend}.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()
    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(1 + rank)
    model = Ragged()  # other values: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt = ZeroRedundancyOptimizer(list(model.parameters()), optimizer_class=MGPO, backend=backend, **BASE_KW, **kw)
    opt.load_state_dict(ckpt["optim"])
    train(DDP(model), opt, shard, on_error=on_error, start=half)
    return model, opt.optim


def _on_every_rank(build):
    """build() on every rank, and every rank learns whether it failed anywhere: a rank whose optimizer could not
    be built would otherwise leave its peer waiting in the first step's collective until the timeout."""
    try:
        obj, err = build(), ""
    except Exception as exc:  # noqa: BLE001 - reported to the test
        obj, err = None, f"{type(exc).__name__}: {exc}"
    errors = [None] * WORLD
    dist.all_gather_object(errors, err)
    return obj, errors


def partition(params):
    """ZeRO's partition (largest first, to the least loaded rank): the owner rank of each parameter."""
    sizes, owner = [0] * WORLD, {}
    for p in sorted(params, key=lambda t: t.numel(), reverse=True):
        r = sizes.index(min(sizes))
        owner[p] = r
        sizes[r] += p.numel()
    return owner


def _run_scenario(rank, backend, scenario, out_dir):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    kind, wrapper, kw, _ = SCENARIOS[scenario]
    model = make_model(kind)
    trainable = [p for p in model.parameters() if p.requires_grad]
    per = BATCH // WORLD
    shard = slice(rank * per, (rank + 1) * per)
    out = {}

    def on_error(t, exc, unchanged):
        out.update(error=f"{type(exc).__name__}: {exc}", error_step=t, unchanged=unchanged)

    if wrapper == "zero_resume":
        model, local = _zero_resume(rank, backend, kw, shard, on_error, out_dir)
    else:
        by_hand = wrapper.startswith("by_hand")
        net = model if by_hand else DDP(model)
        owner = partition(trainable)

        def build():
            if wrapper == "zero":
                return ZeroRedundancyOptimizer(trainable, optimizer_class=MGPO, backend=backend, **BASE_KW, **kw)
            mine = [p for p in trainable if owner[p] == rank] if wrapper == "by_hand_sharded" else trainable
            return MGPO(mine, backend=backend, **BASE_KW, **kw)

        def share():
            for p in trainable:
                dist.broadcast(p.data, src=owner[p])

        opt, errors = _on_every_rank(build)
        if any(errors):
            return {"construction_errors": errors}
        local = opt.optim if wrapper == "zero" else opt
        train(net, opt, shard, average_grads=by_hand, on_error=on_error,
              after_step=share if wrapper == "by_hand_sharded" else None)
    if "error" in out:
        return out
    local.apply_perturbation()  # the point the next training forward would see (ZeRO: shared by the ranks)
    if wrapper == "by_hand_sharded":
        share()
    out["perturbed"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    local.eval()
    owned = {id(p) for g in local.param_groups for p in g["params"]}
    out["owned_theta"] = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in owned}
    out["model_after_eval"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for backend, scenario in CASES:
            try:
                results[(backend, scenario)] = _run_scenario(rank, backend, scenario, out_dir)
            except Exception:  # noqa: BLE001 - e.g. a construction error: reported to the test
                results[(backend, scenario)] = {"crash": traceback.format_exc()}
            dist.barrier()  # both ranks are done with this scenario before the next starts
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks are done talking before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{k}.pt", weights_only=False) for k in range(WORLD)]


# ------------------------------------------------------------------------------------------- the tests
def _close(a, b, what):
    for n in b:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{what} {n}: {m}")


def _results(runs, backend, scenario):
    res = [r[(backend, scenario)] for r in runs]
    for k, r in enumerate(res):
        assert "crash" not in r, f"rank {k}: {r['crash']}"
        assert "construction_errors" not in r, f"the optimizer could not be built: {r['construction_errors']}"
    return res


@pytest.mark.parametrize("backend, scenario", CASES, ids=CASE_IDS)
def test_two_processes_match_one_process_or_refuse_clearly(runs, backend, scenario):
    res = _results(runs, backend, scenario)
    must_mention = SCENARIOS[scenario][3]
    if any("error" in r for r in res):
        assert must_mention is not None, f"refused: {[r.get('error') for r in res]}"
        for k, r in enumerate(res):
            assert "error" in r, f"only rank {1 - k} refused: {res[1 - k]['error']}"
            assert r["error_step"] == 0, (
                f"rank {k} refused at its optimizer's step {r['error_step']}, not the first: {r['error']}")
            assert re.search(must_mention, r["error"]), f"rank {k}: the message does not say what to do: {r['error']}"
            assert r["unchanged"], f"rank {k}: the refused step changed the parameters"
        return
    perturbed, theta = single_process(backend, scenario)
    for k, r in enumerate(res):
        _close(r["perturbed"], perturbed, f"rank {k} perturbed parameters")
        _close(r["owned_theta"], {n: theta[n] for n in r["owned_theta"]}, f"rank {k} theta")
    owned = set(res[0]["owned_theta"]) | set(res[1]["owned_theta"])
    assert owned == set(n for n, p in make_model(SCENARIOS[scenario][0]).named_parameters() if p.requires_grad)


@pytest.mark.parametrize("backend, scenario", SHARDED_CASES, ids=SHARDED_IDS)
def test_sharded_really_split_the_parameters(runs, backend, scenario):
    """The scenarios are what they claim: each rank's MGPO held a different part (empty on rank 1 where there
    is a single tensor)."""
    res = _results(runs, backend, scenario)
    if any("error" in r for r in res):
        pytest.skip("refused at the first step (judged by the test above)")
    a, b = (set(r["owned_theta"]) for r in res)
    assert a and not a & b and (not b if scenario == "zero_empty_shard" else b), (a, b)


@pytest.mark.parametrize("backend, scenario", EVAL_CASES, ids=EVAL_IDS)
def test_eval_on_every_rank_gives_theta_everywhere(runs, backend, scenario):
    """After ``eval()`` of every rank's MGPO, the model each rank evaluates must be theta: with ZeRO a rank also
    holds the other ranks' parameters (broadcast after each step, perturbed)."""
    res = _results(runs, backend, scenario)
    if any("error" in r for r in res):
        pytest.skip("refused at the first step (judged by the test above)")
    _, theta = single_process(backend, scenario)
    for k, r in enumerate(res):
        _close(r["model_after_eval"], theta, f"rank {k} model after eval()")
