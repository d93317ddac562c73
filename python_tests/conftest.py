"""Shared fixtures: every semantic test runs once per backend usable here (reference, cpp, triton...)."""
import os

# Triton kernels run on the CPU under the interpreter; it must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
