"""A few CUDA steps of every GPU backend over ragged, misaligned, mixed-dtype tensors, small enough to run under
compute-sanitizer (memcheck, racecheck) in seconds; exits non-zero if a result disagrees with the reference.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitizer_smoke.py

(benchmarks/gpu_check.sh runs it on a lent GPU.)
"""
import sys

import torch

from mgpo_kernels import MGPO, available_backends

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu" to try it here
SHAPES = [(1,), (3,), (17,), (8, 300), (300, 8), (16385,), (40001,)]


def params(dtype, seed, offset):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in SHAPES:
        n = torch.Size(s).numel()
        buf = torch.zeros(n + 2 * offset + 1, dtype=dtype, device=DEVICE)
        buf[offset:offset + n] = torch.randn(n, generator=g).to(dtype).to(DEVICE)
        out.append(torch.nn.Parameter(buf[offset:offset + n].view(s)))  # a misaligned view when offset is odd
    return out


def run(backend, dtype, offset):
    pa, pb = params(dtype, 0, offset), params(dtype, 0, offset)
    oa = MGPO(pa, lr=1e-2, rho=2.0, max_grad_norm=5.0, backend=backend)
    ob = MGPO(pb, lr=1e-2, rho=2.0, max_grad_norm=5.0, backend="reference")
    gen = torch.Generator().manual_seed(1)
    for t in range(3):
        for i, (a, b) in enumerate(zip(pa, pb)):
            gr = None if (t == 1 and i == 2) else torch.randn(a.shape, generator=gen).to(dtype).to(DEVICE)
            a.grad, b.grad = gr, None if gr is None else gr.clone()
        oa.step()
        ob.step()
    oa.eval()
    ob.eval()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    worst = max(float((a.detach().double() - b.detach().double()).norm()
                      / b.detach().double().norm().clamp_min(1e-30)) for a, b in zip(pa, pb))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ok = worst <= tol
    print(f"{backend:7s} {str(dtype):15s} offset {offset}: max rel diff vs reference {worst:.2e} "
          f"{'ok' if ok else 'FAIL'}")
    return ok


def main():
    backends = [b for b in available_backends(DEVICE) if b != "reference"]
    print(f"backends on {DEVICE}:", backends)
    ok = True
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for offset in (0, 1):
                ok &= run(backend, dtype, offset)
    sys.exit(0 if ok and backends else 1)


if __name__ == "__main__":
    main()
