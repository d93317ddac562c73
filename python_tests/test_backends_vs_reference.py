"""Every fused backend, on every device it runs on here, against the reference backend, step by step, on every
case of backend_cases.py (and on random configurations).

The Triton backend runs on the CPU only under the interpreter (conftest.py turns it on when there is no GPU);
cases too big for the interpreter are skipped there.  Backend-specific tests (instruction sets, thread counts,
table caching, compilation, CUDA graphs) stay in test_cpp_kernels.py and test_triton_kernels.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from backend_cases import CASE_LIST, CASES, Case, Layout, mismatch, run_case, same
from mgpo_kernels.backends import unavailable_reason

FUSED_BACKENDS = ("cpp", "triton")
DEVICES = ("cpu", "cuda")


def _target(backend: str, device: str):
    why = unavailable_reason(backend, device)
    return pytest.param((backend, device), id=f"{backend}-{device}",
                        marks=pytest.mark.skipif(why is not None, reason=f"{backend} on {device}: {why}"))


TARGETS = [_target(b, d) for b in FUSED_BACKENDS for d in DEVICES]


def _interpreted(backend: str, device: str) -> bool:
    """Triton on the CPU is the interpreter (unavailable_reason refuses it otherwise)."""
    return backend == "triton" and torch.device(device).type == "cpu"


def _run(case: Case, target) -> None:
    backend, device = target
    interpreted = _interpreted(backend, device)
    if case.shapes_for(interpreted) is None:
        pytest.skip(f"{case.name} is too big for the Triton interpreter")
    run_case(case, backend, device, interpreted)


@pytest.mark.parametrize("case", CASE_LIST, ids=[c.name for c in CASE_LIST])
@pytest.mark.parametrize("target", TARGETS)
def test_matches_reference_every_step(target, case):
    _run(case, target)


def test_the_small_gradient_cases_are_below_the_gbar_floor():
    """What the two cases are named for: gbar under the default floor (0.1), where the floor decides eps."""
    for name in ("gbar_floor_reached", "no_gbar_floor_small_gradients"):
        for interpreted in (False, True):
            _, ref = run_case(CASES[name], "reference", "cpu", interpreted)
            assert 0.0 < float(ref.global_state()["gbar"]) < 0.1


def test_the_metric_tells_one_rounding_from_a_wrong_value():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert mismatch(x, x) == 0.0
    assert mismatch(x * (1 + 5e-7), x) <= 1.0
    assert mismatch(x * (1 + 5e-6), x) > 1.0
    bf = x.to(torch.bfloat16)
    one_ulp_away = (bf.view(torch.int16) + 1).view(torch.bfloat16)  # the next value away from zero
    assert mismatch(bf, bf) == 0.0 and 0.0 < mismatch(one_ulp_away, bf) <= 1.0
    wrong = bf.clone()
    wrong[3] = wrong[3] * 1.05
    assert mismatch(wrong, bf) > 1.0
    assert mismatch(one_ulp_away.float(), bf.float()) > 1.0  # an fp32 tensor gets no rounding allowance
    nan = x.clone()
    nan[5] = float("nan")
    assert mismatch(nan, nan) == 0.0 and mismatch(nan, x) == float("inf") and mismatch(x, nan) == float("inf")
    assert mismatch(x.double(), x) == float("inf")


# ---------------------------------------------------------------------------------------------- random cases
try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


if given is not None:
    shape_st = st.lists(st.one_of(st.tuples(st.integers(1, 300)),
                                  st.tuples(st.integers(1, 40), st.integers(1, 40))), min_size=1, max_size=4)

    # fixed examples by default (derandomize); MGPO_HYPOTHESIS_EXAMPLES=500 explores with random ones
    _N_EXAMPLES = os.environ.get("MGPO_HYPOTHESIS_EXAMPLES")

    @pytest.mark.parametrize("target", TARGETS)
    @settings(max_examples=int(_N_EXAMPLES or 20), deadline=None, derandomize=_N_EXAMPLES is None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(shapes=shape_st,
           lr=st.sampled_from([1e-4, 1e-2, 0.3]),
           b1=st.sampled_from([0.0, 0.5, 0.9]),
           b2=st.sampled_from([0.9, 0.999, 0.99999]),
           eps=st.sampled_from([1e-8, 1e-3]),
           wd=st.sampled_from([0.0, 0.1]),
           rho=st.sampled_from([0.0, 0.05, 10.0]),
           ema=st.sampled_from([0.0, 0.9]),
           adaptive=st.booleans(),
           direction=st.sampled_from(["momentum", "-momentum"]),
           mgn=st.sampled_from([None, 0.5, 1e4]),
           offset=st.sampled_from([0, 1]),
           dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    def test_random_configurations_match_reference(target, shapes, lr, b1, b2, eps, wd, rho, ema, adaptive,
                                                   direction, mgn, offset, dtype):
        case = Case("random", shapes=same([tuple(s) for s in shapes]), dtypes=(dtype,), steps=3,
                    options=dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, rho=rho, ema_beta=ema,
                                 adaptive_norm=adaptive, direction=direction, max_grad_norm=mgn),
                    layout=Layout(param_offset=offset))
        _run(case, target)
