"""Shared fixtures: every semantic test runs once per backend usable here (reference, cpp, triton...)."""
import os

import torch

# Without a CUDA device the Triton kernels run on the CPU under the interpreter; with one, plain `pytest` tests
# the compiled kernels.  An explicit TRITON_INTERPRET is kept.  Decided before triton is first imported (it reads
# the variable when the kernels are defined); torch.cuda.is_available() does not import triton.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from mgpo_kernels import available_backends, backend_reasons  # noqa: E402

BACKENDS = available_backends("cpu")


def pytest_report_header(config):
    return [f"mgpo backends on cpu: {backend_reasons('cpu')}"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
