"""MGPO under torch.compile (CPU here) and inside a CUDA graph (GPU machines only).

* ``opt.step()`` traces into one graph with no graph break, for every backend (the fused backends are
  ``torch.library`` custom ops with fake implementations), but for the deliberate eager arming of the forward
  hook when eps becomes due (theta at rest); a whole training step at rho = 0 is one graph once Dynamo traces
  autograd (``torch._dynamo.config.trace_autograd_ops``).
* With the learning rate as a tensor, an lr scheduler changing it every step causes no recompilation, and the
  compiled step equals the eager one.
* CUDA graphs: a whole training step captured with MGPO inside, replayed with new data and a changing lr, matches
  eager (run by benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import os

import pytest
import torch

from mgpo_kernels import MGPO, available_backends

BACKENDS = available_backends("cpu")
CUDA_BACKENDS = available_backends("cuda") if torch.cuda.is_available() else []
dynamo = pytest.importorskip("torch._dynamo")


def make(backend, device="cpu", lr=None, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device, dtype)
    lr = torch.tensor(1e-2, device=device) if lr is None else lr
    opt = MGPO(model.parameters(), lr=lr, rho=0.05, weight_decay=0.01, max_grad_norm=1.0, backend=backend)
    return model, opt


def batches(n, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=g).to(device), torch.randn(32, 4, generator=g).to(device))
            for _ in range(n)]


def mgpo_frames(explain_out):
    """Graph-break reasons whose user stack runs through mgpo_kernels."""
    pkg = os.path.dirname(os.path.abspath(__import__("mgpo_kernels").__file__))
    return [b for b in explain_out.break_reasons
            if any(os.path.abspath(fr.filename).startswith(pkg) for fr in b.user_stack)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opt_step_traces_without_graph_breaks(backend):
    model, opt = make(backend)
    (x, y), = batches(1)
    for call in range(2):  # the first call allocates the state inside the trace, the second uses it
        dynamo.reset()
        ((model(x) - y) ** 2).mean().backward()
        ex = dynamo.explain(lambda: opt.step())()
        assert ex.graph_break_count == 0 and ex.graph_count == 1, (call, [b.reason for b in ex.break_reasons])
        opt.zero_grad()


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_training_step_graph_breaks(rho):
    """A compiled whole training step: with rho = 0 (AdamW) MGPO adds no graph break; with rho > 0, theta at rest
    adds two deliberate ones (arming the forward hook at the end of step(), and the hook applying eps at the next
    step's first module call), both eager by design (torch.compiler.disable).  Results equal eager:
    test_at_rest.py::test_compiled_model_or_training_step_equals_eager."""
    model, opt = make("reference")
    opt.rho = rho
    (x, y), = batches(1)

    def train_step():
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    dynamo.reset()
    train_step()  # the state exists and, with rho > 0, the hook is due: the traced step is a steady one
    ex = dynamo.explain(train_step)()
    reasons = [b.reason for b in mgpo_frames(ex)]
    assert len(reasons) <= (0 if rho == 0 else 2), reasons
    assert all("disable" in r or "skip" in r.lower() for r in reasons), reasons
    if hasattr(dynamo.config, "trace_autograd_ops") and rho == 0:
        dynamo.reset()
        with dynamo.config.patch(trace_autograd_ops=True):
            ex = dynamo.explain(train_step)()
        assert ex.graph_break_count == 0 and ex.graph_count == 1, [b.reason for b in ex.break_reasons]


def _compile_cases():
    for b in BACKENDS:
        for dtype in (torch.float32, torch.bfloat16):
            yield pytest.param(b, dtype, id=f"{b}-{str(dtype).split('.')[-1]}")


@pytest.mark.parametrize("backend, dtype", list(_compile_cases()))
def test_tensor_lr_scheduler_does_not_recompile_and_matches_eager(backend, dtype):
    from torch._dynamo.testing import CompileCounterWithBackend

    steps = 7
    data = [(x.to(dtype), y.to(dtype)) for x, y in batches(steps)]

    def run(compiled):
        dynamo.reset()
        model, opt = make(backend, dtype=dtype)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
        cnt = CompileCounterWithBackend("aot_eager")
        step = torch.compile(lambda: opt.step(), backend=cnt) if compiled else (lambda: opt.step())
        frames, lrs = [], []
        for x, y in data:
            ((model(x) - y) ** 2).mean().backward()
            step()
            opt.zero_grad()
            sched.step()
            frames.append(cnt.frame_count)
            lrs.append(float(opt.param_groups[0]["lr"]))
        opt.eval()
        return frames, lrs, [p.detach().clone() for p in model.parameters()], opt

    _, lrs_eager, p_eager, opt_eager = run(False)
    frames, lrs, p_comp, opt_comp = run(True)
    assert len(set(lrs)) == steps  # the lr changed every step ...
    # ... and after the second call (the first one allocated the state) nothing was compiled again
    assert frames[1] == frames[-1], frames
    for a, b in zip(p_comp, p_eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for k in ("step", "gbar", "coef"):
        torch.testing.assert_close(opt_comp.global_state[k], opt_eager.global_state[k], rtol=1e-6, atol=0)


@pytest.mark.skipif(not CUDA_BACKENDS, reason="needs a CUDA device (run by benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["none"])
def test_cuda_graph_captured_training_step_matches_eager(backend):
    """Forward, backward and MGPO step captured in one CUDA graph, replayed with new data (copied into the static
    inputs) and an lr changed in place by a scheduler, against the same steps run eagerly."""
    dev = "cuda"
    warm, steps = 3, 8
    data = batches(warm + steps, dev)

    def loss_fn(model, x, y):
        return ((model(x) - y) ** 2).mean()

    model_e, opt_e = make(backend, dev)
    model_g, opt_g = make(backend, dev)
    sched_e = torch.optim.lr_scheduler.LambdaLR(opt_e, lambda s: 1.0 / (1.0 + s))
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: 1.0 / (1.0 + s))

    # warm-up on a side stream (allocates the state), identical on both copies
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x, y in data[:warm]:
            opt_g.zero_grad(set_to_none=True)
            loss_fn(model_g, x, y).backward()
            opt_g.step()
            sched_g.step()
    torch.cuda.current_stream().wait_stream(s)
    for x, y in data[:warm]:
        opt_e.zero_grad(set_to_none=True)
        loss_fn(model_e, x, y).backward()
        opt_e.step()
        sched_e.step()

    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    graph = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = loss_fn(model_g, static_x, static_y)
        static_loss.backward()
        opt_g.step()

    for x, y in data[warm:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        sched_g.step()
        opt_e.zero_grad(set_to_none=True)
        loss_e = loss_fn(model_e, x, y)
        loss_e.backward()
        opt_e.step()
        sched_e.step()
        torch.testing.assert_close(static_loss, loss_e, rtol=1e-5, atol=1e-6)
    torch.cuda.synchronize()
    for a, b in zip(model_g.parameters(), model_e.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in ("step", "gbar", "coef"):
        torch.testing.assert_close(opt_g.global_state[k], opt_e.global_state[k], rtol=1e-5, atol=0)
    assert float(opt_g.global_state["step"]) == warm + steps
    opt_g.eval()
    opt_e.eval()
    for a, b in zip(model_g.parameters(), model_e.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
