"""Optimizer-step benchmark on the LoRA tensors of LLaMA-2-7B (``mgpo-bench step``).

Every LoRA tensor of LLaMA-2-7B with adapters on all linear layers (shapes.py), fp32, one step of each method
on fresh random gradients.  Methods are interleaved round-robin (a fresh random order each round, timing.py) so
drift of a shared machine hits all of them alike, and the copy bandwidth of the same device is measured inside
the same rounds.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from . import charts
from . import common as C
from .backend_choice import choose_backends
from .memory import CpuAllocPeak
from .shapes import N_LAYERS, lora_shapes, numel
from .tensors import GRAD_STD, params_sharing_grads, refill
from .timing import paired_quantiles, percentile, summarize, time_interleaved

# hyper-parameters of the benchmarked step (the values do not change the work done)
LR, BETAS, RHO, EMA_BETA, MAX_GRAD_NORM = 1e-4, (0.9, 0.999), 0.05, 0.9, 1.0


# ----------------------------------------------------------------------------------------------- methods


class Method:
    """One row of the table: owns its parameters and optimizer state; gradients are shared and refilled."""

    name = "?"
    key = "?"
    passes = 7  # fp32 passes over the parameters' size each step must make at least (read + written)
    clip = False

    def __init__(self, params: List[Tensor]):
        self.params = params

    def step(self) -> None:
        raise NotImplementedError

    def state_tensors(self) -> List[Tensor]:
        """Every tensor the method keeps between steps besides parameters and gradients."""
        out = []
        for st in self.opt.state.values():
            out += [v for v in st.values() if isinstance(v, Tensor)]
        return out


class TorchAdamW(Method):
    def __init__(self, params, impl: str, clip: bool = False):
        super().__init__(params)
        kw = {"foreach": True} if impl == "foreach" else {"fused": True}
        self.opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0, **kw)
        self.clip = clip
        self.name = ("clip_grad_norm_ + " if clip else "") + f"torch AdamW ({impl})"
        self.key = ("clip+" if clip else "") + f"adamw-{impl}"
        self.passes = 8 if clip else 7  # the clip must read the gradients once more (norm); scaling can be fused

    def step(self):
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM, foreach=True)
        self.opt.step()


class OurMGPO(Method):
    # theta at rest: the apply pass of the training forward (read p, m; write p) + a reduce pass (read g, m) + the
    # fused update (read p, g, m, v; write p, m, v), which also removes eps
    passes = 12

    def __init__(self, params, backend: str, clip: bool):
        super().__init__(params)
        from mgpo_kernels import MGPO

        self.opt = MGPO(params, lr=LR, betas=BETAS, weight_decay=0.0, rho=RHO, ema_beta=EMA_BETA,
                        max_grad_norm=MAX_GRAD_NORM if clip else None, backend=backend)
        self.clip = clip
        self.name = f"MGPO [{backend}] apply + step" + (" + max_grad_norm" if clip else "")
        self.key = f"mgpo-{backend}" + ("+clip" if clip else "")

    def step(self):
        self.opt.apply_perturbation()  # what the training forward's hook runs (no module here)
        self.opt.step()

    def state_tensors(self):
        out = super().state_tensors()
        gs = self.opt._gstate
        if gs is not None:
            out += list(gs.tensors().values())
        return out


class NaiveMGPO(Method):
    """MGPO as a user would write it by hand around torch's AdamW: separate foreach calls, one ``.item()``.

    Exactly the paper's step (restore, AdamW, eps = rho * m / |m| / gbar, perturb), with the perturbation
    coefficient kept as a Python float (hence the one host synchronisation per step).
    """

    passes = 9

    def __init__(self, params, clip: bool):
        super().__init__(params)
        self.opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0, foreach=True)
        self.clip = clip
        self.coef = 0.0
        self.gbar: Optional[Tensor] = None
        self.name = "naive PyTorch MGPO (foreach, 1 .item())" + (" + clip" if clip else "")
        self.key = "naive-mgpo" + ("+clip" if clip else "")

    @torch.no_grad()
    def step(self):
        params = self.params
        grads = [p.grad for p in params]
        gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self.clip:
            c = (MAX_GRAD_NORM / (gnorm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, c)
            gnorm = gnorm * c
        self.gbar = gnorm if self.gbar is None else EMA_BETA * self.gbar + (1 - EMA_BETA) * gnorm
        if self.coef != 0.0:  # restore theta = p - coef * m_{t-1}
            torch._foreach_add_(params, [self.opt.state[p]["exp_avg"] for p in params], alpha=-self.coef)
        self.opt.step()
        ms = [self.opt.state[p]["exp_avg"] for p in params]
        mnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ms)))
        coef = (RHO / (mnorm * self.gbar)).item()  # the host synchronisation
        self.coef = coef if math.isfinite(coef) else 0.0
        torch._foreach_add_(params, ms, alpha=self.coef)

    def state_tensors(self):
        return super().state_tensors() + ([self.gbar] if self.gbar is not None else [])


def method_factories(backends: List[str]) -> Dict[str, Callable[[List[Tensor]], Method]]:
    """Row key -> constructor taking the parameters, in table order."""
    f: Dict[str, Callable[[List[Tensor]], Method]] = {
        "adamw-foreach": lambda p: TorchAdamW(p, "foreach"),
        "adamw-fused": lambda p: TorchAdamW(p, "fused"),
        "clip+adamw-fused": lambda p: TorchAdamW(p, "fused", clip=True),
    }
    for b in backends:
        f[f"mgpo-{b}"] = lambda p, b=b: OurMGPO(p, b, clip=False)
        f[f"mgpo-{b}+clip"] = lambda p, b=b: OurMGPO(p, b, clip=True)
    f["naive-mgpo"] = lambda p: NaiveMGPO(p, clip=False)
    f["naive-mgpo+clip"] = lambda p: NaiveMGPO(p, clip=True)
    return f


def build_methods(shapes, device, backends: List[str], include: Optional[List[str]], seed: int,
                  grads: List[Tensor]) -> List[Method]:
    factories = method_factories(backends)
    keys = list(factories)
    if include:
        unknown = [k for k in include if k not in factories]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; valid here: {keys}")
        keys = [k for k in keys if k in include or k == "adamw-fused"]
    gen = torch.Generator(device=device).manual_seed(seed + 12345)
    return [factories[k](params_sharing_grads(shapes, device, gen, grads)) for k in keys]


# ----------------------------------------------------------------------------------------------- probes


def measure_memory(m: Method, device, n: int, grads, gen) -> Dict[str, float]:
    """Extra persistent state beyond AdamW's 8 B/param, and the temporary peak of one step, per parameter."""
    state = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in m.state_tensors()}
    extra_state = (sum(state.values()) - 8 * n) / n
    refill(grads, gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        m.step()
        torch.cuda.synchronize(device)
        temp = torch.cuda.max_memory_allocated(device) - base
        how = "torch.cuda.max_memory_allocated"
    else:
        with CpuAllocPeak() as probe:
            m.step()
        temp = probe.peak_delta
        how = "torch.profiler CPU allocator events"
    return {"extra_state_B_per_param": extra_state, "temp_B_per_param": temp / n, "temp_bytes": temp,
            "memory_method": how}


def count_launches(m: Method, device, grads, gen, steps: int = 3) -> Optional[float]:
    """GPU kernels (and memcpy/memset) per step from torch.profiler, CUDA only."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        refill(grads, gen)
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                m.step()
            torch.cuda.synchronize(device)
        n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        return n / steps
    except Exception as e:  # pragma: no cover - profiler quirks
        warnings.warn(f"launch count failed for {m.name}: {e}")
        return None


def count_syncs(m: Method, device, grads, gen) -> Optional[int]:
    """Host synchronisations in one step, via torch.cuda.set_sync_debug_mode('warn'), CUDA only."""
    if device.type != "cuda":
        return None
    refill(grads, gen)
    torch.cuda.synchronize(device)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                m.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum(1 for x in w if "synchroniz" in str(x.message).lower())
    except Exception:  # pragma: no cover
        return None


def run_rank(rank: int, layers: int, device: torch.device, backends: List[str], reps: int, warmup: int,
             include: Optional[List[str]], seed: int, flush_mb: int, progress: bool = True) -> Dict:
    shapes = lora_shapes(layers, rank)
    n = numel(shapes)
    gen = torch.Generator(device=device).manual_seed(seed)
    grads = [torch.empty(s, device=device) for s in shapes]
    refill(grads, gen)
    methods = build_methods(shapes, device, backends, include, seed, grads)

    # copy bandwidth of the same device, in the same rounds: a buffer at least the size of the parameters
    copy_elems = max(n, (flush_mb << 20) // 4)
    src = torch.randn(copy_elems, device=device)
    dst = torch.empty_like(src)
    flush_buf = torch.empty((flush_mb << 20) // 4, device=device)  # evicts caches between steps
    # CPU: torch.dot over two flat fp32 buffers of the parameters' size reads what MGPO's pass 1 reads (8 B/param)
    dot_a = torch.randn(n, device=device) if device.type == "cpu" else None
    dot_b = torch.randn(n, device=device) if device.type == "cpu" else None

    for m in methods:  # warm-up: state allocation, Triton compilation, caches of the allocator
        for _ in range(warmup):
            refill(grads, gen)
            m.step()
    for _ in range(max(1, warmup)):
        dst.copy_(src)
    C.sync(device)

    # the methods, and in the same rounds the device's copy and in-place bandwidth (and on a CPU torch.dot)
    contenders: Dict[str, Callable[[], object]] = {m.key: m.step for m in methods}
    contenders["copy"] = lambda: dst.copy_(src)
    contenders["inplace"] = lambda: dst.mul_(1.0)
    if dot_a is not None:
        contenders["dot"] = lambda: torch.dot(dot_a, dot_b)
    method_keys = set(contenders) - {"copy", "inplace", "dot"}

    def before(key: str) -> None:
        if key in method_keys:
            refill(grads, gen)
        flush_buf.fill_(1.0)

    bar = C.tqdm(total=reps * len(contenders), desc=f"step r={rank} L={layers}", disable=not progress)
    times = time_interleaved(contenders, reps, order="shuffle", seed=seed, device=device, before=before,
                             after=lambda key: bar.update(1))
    bar.close()

    copy_t = percentile(times["copy"], 50)
    copy_gbs = 2 * 4 * copy_elems / copy_t / 1e9
    inplace_gbs = 2 * 4 * copy_elems / percentile(times["inplace"], 50) / 1e9
    ref_key = "adamw-fused"
    ref_ms = summarize(times[ref_key])["median_ms"]
    rows = []
    for m in methods:
        s = summarize(times[m.key])
        bytes_moved = m.passes * 4 * n
        gbs = bytes_moved / (s["median_ms"] / 1e3) / 1e9
        mem = measure_memory(m, device, n, grads, gen)
        paired = paired_quantiles(times[m.key], times[ref_key])  # same rounds: the machine's drift cancels
        rows.append({
            "key": m.key, "method": m.name, "rank": rank, "layers": layers, "params": n, "tensors": len(shapes),
            **s, "ratio_to_fused_adamw": paired["median"], "ratio_p20": paired["p20"],
            "ratio_p80": paired["p80"], "ratio_of_medians": s["median_ms"] / ref_ms,
            "passes": m.passes, "bytes": bytes_moved,
            "GBps": gbs, "frac_copy_bw": gbs / copy_gbs, **mem,
            "launches_per_step": count_launches(m, device, grads, gen),
            "host_syncs_per_step": count_syncs(m, device, grads, gen),
            "times_ms": [1e3 * t for t in times[m.key]],
        })
    # sanity: the benchmarked steps produced finite parameters
    bad = [m.name for m in methods if not all(torch.isfinite(p).all() for p in m.params)]
    if bad:
        warnings.warn(f"non-finite parameters after the benchmark: {bad}")
    dot = None
    if "dot" in times:  # a reference row, not a method: kept out of "rows"
        ds = summarize(times["dot"])
        dot_gbs = 8 * n / (ds["median_ms"] / 1e3) / 1e9
        dot = {**ds, "ratio_to_fused_adamw": paired_quantiles(times["dot"], times[ref_key])["median"],
               "bytes": 8 * n, "GBps": dot_gbs, "frac_copy_bw": dot_gbs / copy_gbs}
    res = {"rank": rank, "layers": layers, "params": n, "tensors": len(shapes), "copy_GBps": copy_gbs,
           "inplace_GBps": inplace_gbs,
           "copy_bytes": 2 * 4 * copy_elems, "copy_median_ms": 1e3 * copy_t, "rows": rows, "dot": dot}
    del contenders, methods, grads, src, dst, flush_buf, dot_a, dot_b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------------------------- report


def markdown_rank(res: Dict, device: torch.device) -> str:
    on_cuda = device.type == "cuda"
    head = (f"## r = {res['rank']}: {res['tensors']} tensors, {res['params'] / 1e6:.2f}M parameters "
            f"({res['layers']} of 32 layers); copy bandwidth {res['copy_GBps']:.1f} GB/s "
            f"({res['copy_bytes'] / 2**20:.0f} MiB read+written; an in-place `mul_` of the same buffer: "
            f"{res.get('inplace_GBps', float('nan')):.1f} GB/s)\n\n")
    headers = ["Method", "median ms", "p20–p80 ms", "× fused AdamW", "passes", "GB/s", "% copy BW",
               "extra state B/param", "step temp B/param"]
    if on_cuda:
        headers += ["launches/step", "host syncs/step"]
    rows = []
    for r in res["rows"]:
        row = [r["method"], C.fmt(r["median_ms"], 3), f"{r['p20_ms']:.3f}–{r['p80_ms']:.3f}",
               C.fmt(r["ratio_to_fused_adamw"], 2), r["passes"], C.fmt(r["GBps"], 1),
               C.fmt(100 * r["frac_copy_bw"], 0), C.fmt(r["extra_state_B_per_param"], 3),
               C.fmt(r["temp_B_per_param"], 3)]
        if on_cuda:
            row += [C.fmt(r["launches_per_step"], 0), r["host_syncs_per_step"]]
        rows.append(row)
    d = res.get("dot")
    if d:  # what reading 8 B/param (g and m: MGPO's pass 1) costs on this device, for scale
        rows.append(["torch.dot(g, m) on flat buffers (reference: reads 8 B/param)", C.fmt(d["median_ms"], 3),
                     f"{d['p20_ms']:.3f}–{d['p80_ms']:.3f}", C.fmt(d["ratio_to_fused_adamw"], 2), 2,
                     C.fmt(d["GBps"], 1), C.fmt(100 * d["frac_copy_bw"], 0), "—", "—"])
    return head + C.md_table(headers, rows)


NOTES = """
Reading the columns: *× fused AdamW* is the median over rounds of the method's step time over torch fused
AdamW's in the same round; *passes* is the fewest fp32 passes over the parameters' size each method must make
(AdamW reads p, g, m, v and writes p, m, v = 7; the clip adds a read of g = 8; MGPO adds a reduce pass over g and m
before the update and the apply pass of eps at the training forward (read p, m, write p) = 12, and the clip costs it
nothing more; MGPO's rows time the apply pass and the step together); GB/s = passes × 4 B × parameters / median time;
% copy BW = that over the device-to-device copy bandwidth measured in the same rounds (on a CPU a copy into
another buffer also pays a read-for-ownership of every destination line, which in-place updates such as AdamW's
do not, so they can pass 100%; the in-place `mul_` bandwidth in the heading is the fairer ceiling there). *extra state* is the bytes
per parameter a method keeps between steps beyond AdamW's m and v (8 B/param); *step temp* is the peak of
temporary memory inside one step above what was allocated before it ({mem}). On a CPU the *torch.dot* row
(not a method) times `torch.dot` of two flat fp32 buffers of the parameters' size in the same rounds: the
bandwidth a read of g and m (MGPO's reduce pass, 2 of its 9 passes) gets here.
Gradients are fresh N(0, {std}) draws before every step (untimed), a {flush} MiB buffer is written between steps
to evict caches, and methods run round-robin in a fresh random order each round.
"""


def chart(payload: Dict, path) -> None:
    plt = charts.pyplot()
    ranks = payload["ranks"]
    per_rank = payload["results"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    ax = axes[0]
    keys = [r["key"] for r in per_rank[0]["rows"]]
    names = {r["key"]: r["method"] for r in per_rank[0]["rows"]}
    charts.ratio_bars(ax, per_rank, keys, names, "ratio_to_fused_adamw", fontsize=8)
    ax.set_xlabel("step time / torch fused AdamW (median)")
    ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.set_title("optimizer step, time ratio")
    ax = axes[1]
    for k in keys:
        xs, ys = [], []
        for res in per_rank:
            for r in res["rows"]:
                if r["key"] == k:
                    xs.append(res["rank"])
                    ys.append(r["median_ms"])
        ax.plot(xs, ys, marker="o", label=names[k])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"step time vs rank ({per_rank[0]['layers']} of 32 layers, {payload['device']})")
    ax.legend(fontsize=7)
    charts.save(fig, plt, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128], help="LoRA ranks (default 8 32 128)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of LLaMA-2-7B to take (default: 32 on CUDA, 4 on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per method (default: 50 CUDA, 15 CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first (default 3)")
    p.add_argument("--backends", nargs="*", default=None,
                   help="MGPO backends to run (default: every usable one, see mgpo_kernels.available_backends)")
    p.add_argument("--methods", nargs="*", default=None,
                   help="only these row keys (torch fused AdamW is always kept as the reference)")
    p.add_argument("--flush-mb", type=int, default=None,
                   help="MiB written between steps to evict caches; also the copy-bandwidth buffer's minimum "
                        "(default 256 CUDA, 128 CPU)")


def run(args) -> Dict:
    device = C.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    layers = args.layers or (N_LAYERS if device.type == "cuda" else 4)
    reps = args.reps or (50 if device.type == "cuda" else 15)
    flush_mb = args.flush_mb or (256 if device.type == "cuda" else 128)
    backends, usable, reasons = choose_backends(device, args.backends)
    payload = {
        **C.run_record("step", device, backends, usable, reasons),
        "ranks": args.ranks, "layers": layers, "reps": reps, "warmup": args.warmup,
        "flush_mb": flush_mb, "hparams": {"lr": LR, "betas": BETAS, "rho": RHO, "ema_beta": EMA_BETA,
                                          "max_grad_norm": MAX_GRAD_NORM, "grad_std": GRAD_STD},
        "results": [],
    }
    for r in args.ranks:
        try:
            payload["results"].append(run_rank(r, layers, device, backends, reps, args.warmup, args.methods,
                                               args.seed, flush_mb, progress=not args.no_progress))
        except KeyboardInterrupt:  # e.g. a time limit: keep the ranks already measured
            payload["interrupted"] = f"interrupted during r={r}"
            print(f"\n[mgpo-bench] interrupted during r={r}; writing the ranks done", file=sys.stderr)
            break
    if not payload["results"]:
        raise SystemExit("no rank finished")
    payload["loadavg_at_end"] = C.load_average()
    mem_how = payload["results"][0]["rows"][0]["memory_method"]
    md = C.report_heading(f"MGPO optimizer-step benchmark ({device})", payload)
    md += "\n".join(markdown_rank(res, device) for res in payload["results"])
    md += NOTES.format(mem=mem_how, std=GRAD_STD, flush=flush_mb)
    name = args.name or ("step-r" + "-".join(map(str, args.ranks)) + ("" if layers == N_LAYERS else f"-L{layers}"))
    return C.publish(args.out_dir, device, name, payload, md, None if args.no_chart else chart)
