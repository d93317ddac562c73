"""End-to-end overhead of MGPO against plain LoRA, the paper's Table 3 side by side (``mgpo-bench table3``).

A real ``transformers`` LlamaForCausalLM built from a LlamaConfig (random weights, nothing downloaded) with
``peft`` LoRA (all linear layers, fp32 adapters) runs real training steps: forward, backward, gradient
accumulation, clipping, optimizer step, cosine schedule with warm-up, on random token ids.  Rows:

* ``lora``     LoRA + torch fused AdamW, ``clip_grad_norm_`` before it;
* ``authors``  LoRA-MGPO as the authors' public code runs it (authors_procedure.py) + torch fused AdamW + clip;
* ``mgpo-<b>`` LoRA-MGPO with our optimizer, backend <b>, clip fused (``MGPO(max_grad_norm=...)``), for every
  backend usable on the device.

Each row runs in its own fresh process (so its peak memory is its own).  On CPU all rows' processes are started
together and their optimizer steps are interleaved round-robin (one process runs at a time), so drift of a shared
machine hits all rows alike; on CUDA the rows run one after another.  Peak memory: CUDA
``torch.cuda.max_memory_allocated``; CPU the process's peak RSS and the peak of live tensor bytes over one
instrumented step (gc-enumerated live tensors at the step boundary + the running sum of the CPU allocator's
allocation/free events recorded by ``torch.profiler(profile_memory=True)`` during the step).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import charts
from . import common as C
from .backend_choice import choose_backends
from .memory import CpuAllocPeak, current_rss_bytes, live_tensor_bytes, peak_rss_bytes
from .timing import paired_quantiles, percentile, shuffled_orders, summarize

PRESETS: Dict[str, Dict[str, Any]] = {
    # a scaled-down Llama that runs on a 2-core CPU in a few minutes for every row
    "default": dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, vocab=8192, seq=256,
                    micro_batch=2, accum=2, base_dtype="auto", ranks=[8], steps=6, warmup=1),
    # the paper's setting (Table 3: LLaMA-2-7B, seq 1024, micro-batch 4 x 8 accumulation, bf16 base)
    "llama2-7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, seq=1024,
                      micro_batch=4, accum=8, base_dtype="bfloat16", ranks=[8, 32, 128], steps=3, warmup=1),
    # for tests
    "tiny": dict(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=4, vocab=512, seq=32, micro_batch=2,
                 accum=2, base_dtype="auto", ranks=[8], steps=2, warmup=1),
}

#: the paper's Table 3 (LLaMA-2-7B, r=128 = 320M trainable parameters, one epoch of a 52k WizardLM subset,
#: NVIDIA H20 96GB, effective batch 32, sequence length 1024)
PAPER_TABLE3 = {
    "LoRA": {"params": "320M", "memory_gb": 81.73, "time": "5h 48min", "time_s": 5 * 3600 + 48 * 60},
    "LoRA-MGPO": {"params": "320M", "memory_gb": 90.56, "time": "6h 52min", "time_s": 6 * 3600 + 52 * 60},
}
WIZARDLM_SAMPLES = 52_000

# training hyper-parameters (paper §3.1, NLG): lr 2e-5, cosine with 3% warm-up, wd 0, rho 0.01, beta1 0.8, beta 0.8
LR, WARMUP_RATIO, RHO, BETA1_MGPO, EMA_BETA = 2e-5, 0.03, 0.01, 0.8, 0.8


def row_specs(backends: List[str]) -> List[Dict[str, str]]:
    rows = [
        {"key": "lora", "method": "LoRA + torch fused AdamW (+ clip_grad_norm_)", "short": "LoRA (fused AdamW)"},
        {"key": "authors", "method": "LoRA-MGPO, authors' procedure (W0 perturbation, fused AdamW + clip)",
         "short": "LoRA-MGPO, authors' procedure"},
    ]
    for b in backends:
        rows.append({"key": f"mgpo-{b}", "method": f"LoRA-MGPO, ours: MGPO [{b}] (clip fused)",
                     "short": f"LoRA-MGPO, ours [{b}]", "backend": b})
    return rows


# ============================================================================================ worker process


class _Worker:
    def __init__(self, spec: Dict[str, Any]):
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.rss_after_import = current_rss_bytes()
        t0 = time.perf_counter()
        self._build()
        self.setup_s = time.perf_counter() - t0

    def _build(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup
        from peft import LoraConfig, get_peft_model

        s, dev = self.spec, self.device
        torch.manual_seed(s["seed"])
        base_dtype = getattr(torch, s["base_dtype"])
        cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                          num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                          num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                          max_position_embeddings=max(s["seq"], 4096), use_cache=False)
        old = torch.get_default_dtype()
        torch.set_default_dtype(base_dtype)
        try:
            with torch.device(dev):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(old)
        model.config.use_cache = False
        if s.get("grad_ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lcfg = LoraConfig(r=s["rank"], lora_alpha=s["lora_alpha"], target_modules="all-linear", lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:  # fp32 adapters (peft upcasts them already; make sure)
            if p.dtype != torch.float32:
                p.data = p.data.float()
        model.train()
        self.model, self.trainable = model, trainable
        self.n_trainable = sum(p.numel() for p in trainable)
        self.n_total = sum(p.numel() for p in model.parameters())

        kind = s["kind"]
        self.proc = None
        if kind == "lora":
            opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
        elif kind == "authors":
            from .authors_procedure import AuthorsProcedure

            opt = torch.optim.AdamW(trainable, lr=LR, betas=(BETA1_MGPO, 0.999), weight_decay=0.0, fused=True)
            self.proc = AuthorsProcedure(model, opt, rho=RHO, beta=EMA_BETA)
        else:
            from mgpo_kernels import MGPO

            opt = MGPO(trainable, lr=LR, betas=(BETA1_MGPO, 0.999), weight_decay=0.0, rho=RHO, ema_beta=EMA_BETA,
                       max_grad_norm=s["max_grad_norm"], backend=s["backend"])
        total = s["schedule_steps"]
        self.opt = opt
        self.sched = get_cosine_schedule_with_warmup(opt, max(1, math.ceil(WARMUP_RATIO * total)), total)
        self.gen = torch.Generator(device=dev).manual_seed(s["seed"] + 1)
        self.steps_done = 0
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.model_bytes = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            self.model_bytes = None

    def train_step(self) -> Dict[str, float]:
        s, dev = self.spec, self.device
        C.sync(dev)
        syncs0 = self.proc.host_syncs if self.proc else 0
        t0 = time.perf_counter()
        loss_acc = torch.zeros((), device=dev)
        for _ in range(s["accum"]):
            ids = torch.randint(0, s["vocab"], (s["micro_batch"], s["seq"]), device=dev, generator=self.gen)
            if self.proc is not None:
                self.proc.before_forward()
            out = self.model(input_ids=ids, labels=ids)
            (out.loss / s["accum"]).backward()
            if self.proc is not None:
                self.proc.after_backward()
            loss_acc += out.loss.detach().float()
            del out
        C.sync(dev)
        t1 = time.perf_counter()
        if s["kind"] != "mgpo":
            torch.nn.utils.clip_grad_norm_(self.trainable, s["max_grad_norm"])
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        loss = float(loss_acc / s["accum"])  # the one host synchronisation of every row's loop (loss logging)
        t2 = time.perf_counter()
        self.steps_done += 1
        syncs = (self.proc.host_syncs - syncs0 if self.proc else 0) + 1
        return {"t": t2 - t0, "t_fwd_bwd": t1 - t0, "t_opt": t2 - t1, "loss": loss, "host_syncs": syncs}

    def memory(self) -> Dict[str, Any]:
        dev = self.device
        out: Dict[str, Any] = {"peak_rss": peak_rss_bytes(), "rss_after_import": self.rss_after_import}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            out.update(peak_allocated=torch.cuda.max_memory_allocated(dev),
                       peak_reserved=torch.cuda.max_memory_reserved(dev), model_bytes=self.model_bytes)
        return out

    def measure_live(self) -> Dict[str, Any]:
        """Peak live tensor bytes over one more training step (CPU)."""
        base = live_tensor_bytes("cpu")
        with CpuAllocPeak() as probe:
            r = self.train_step()
        after = live_tensor_bytes("cpu")
        return {"live_base": base, "peak_live": base + probe.peak_delta, "live_after": after,
                "live_after_from_events": base + probe.final_delta, "alloc_events": probe.events,
                "instrumented_step_s": r["t"]}


def worker_main(spec_json: str) -> None:
    """Entry of a row's process: line-oriented JSON on the original stdout; anything else goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        spec = json.loads(spec_json)
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        w = _Worker(spec)
        for _ in range(spec["warmup"]):
            w.train_step()
        send({"ready": True, "params": w.n_trainable, "total_params": w.n_total, "setup_s": w.setup_s,
              "adapter_dtypes": sorted({str(p.dtype) for p in w.trainable}),
              "base_dtypes": sorted({str(p.dtype) for p in w.model.parameters() if not p.requires_grad}),
              "lora_layers": sum(1 for m in w.model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")),
              "optimizer": type(w.opt).__name__ + (f"[{w.opt.backend}]"
                                                   if type(w.opt).__module__.startswith("mgpo_kernels") else "")})
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "step":
                send(w.train_step())
            elif cmd == "memory":
                send(w.memory())
            elif cmd == "live":
                send(w.measure_live())
            elif cmd == "exit":
                break
    except Exception as e:  # reported to the parent, which keeps the other rows
        import traceback

        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})


# ============================================================================================ parent


class _Proc:
    def __init__(self, spec: Dict[str, Any], env: Dict[str, str]):
        self.spec = spec
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"mgpo-bench-{spec['key']}-", suffix=".log",
                                               delete=False)
        self.p = subprocess.Popen([sys.executable, "-m", "mgpo_kernels.bench.table3", "--worker", json.dumps(spec)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                  bufsize=1, env=env)
        self.error: Optional[str] = None

    def recv(self) -> Dict[str, Any]:
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            raise RuntimeError(f"worker exited (code {self.p.returncode}); log tail:\n{self.log_tail()}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{msg['error']}; log tail:\n{self.log_tail()}")
        return msg

    def ask(self, cmd: str) -> Dict[str, Any]:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.recv()

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(Path(self.log.name).read_text().splitlines()[-n:])
        except Exception:
            return ""

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            if self.p.poll() is None:
                self.p.stdin.write("exit\n")
                self.p.stdin.flush()
                self.p.wait(timeout=60)
        except Exception:
            self.p.kill()
        finally:
            self.log.close()
            if self.error is None:
                try:
                    os.unlink(self.log.name)
                except OSError:
                    pass


def _worker_env() -> Dict[str, str]:
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("KINETO_LOG_LEVEL", "5")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_rank(rank: int, cfg: Dict[str, Any], rows: List[Dict[str, str]], device: torch.device, args,
             progress: bool) -> List[Dict[str, Any]]:
    env = _worker_env()
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    specs = []
    for r in rows:
        kind = "mgpo" if r["key"].startswith("mgpo-") else r["key"]
        specs.append(dict(cfg, key=r["key"], kind=kind, backend=r.get("backend"), rank=rank, device=str(device),
                          seed=args.seed, lora_alpha=args.lora_alpha, max_grad_norm=args.max_grad_norm,
                          grad_ckpt=args.grad_ckpt, threads=args.threads,
                          schedule_steps=cfg["warmup"] + cfg["steps"] + 2))
    results = {r["key"]: dict(r, rank=rank, times=[], t_fwd_bwd=[], t_opt=[], host_syncs=[], losses=[])
               for r in rows}

    def fail(proc: _Proc, e: Exception):
        proc.error = str(e)
        results[proc.spec["key"]]["error"] = str(e)
        print(f"\n[mgpo-bench] row {proc.spec['key']} (r={rank}) failed: {e}\n[log: {proc.log.name}]",
              file=sys.stderr)

    def record(proc: _Proc, msg: Dict[str, Any]):
        res = results[proc.spec["key"]]
        res["times"].append(msg["t"])
        res["t_fwd_bwd"].append(msg["t_fwd_bwd"])
        res["t_opt"].append(msg["t_opt"])
        res["host_syncs"].append(msg["host_syncs"])
        res["losses"].append(msg["loss"])

    steps = cfg["steps"]
    bar = C.tqdm(total=len(rows) * (steps + 1), desc=f"table3 r={rank}", disable=not progress)
    procs: List[_Proc] = []
    interrupted = False
    try:
        if device.type == "cpu" and not args.sequential:
            # all rows alive at once, steps interleaved round-robin (a fresh random order each round)
            procs = [_Proc(sp, env) for sp in specs]
            live = []
            for p in procs:
                try:
                    results[p.spec["key"]].update(p.recv())
                    live.append(p)
                except Exception as e:
                    fail(p, e)
                bar.update(1)
            for order in shuffled_orders(live, steps, args.seed):
                for p in order:
                    if p.error is None:
                        try:
                            record(p, p.ask("step"))
                        except Exception as e:
                            fail(p, e)
                    bar.update(1)
            for p in live:
                if p.error is None:
                    try:
                        results[p.spec["key"]].update(p.ask("memory"))
                        if not args.no_live:
                            results[p.spec["key"]].update(p.ask("live"))
                    except Exception as e:
                        fail(p, e)
        else:
            for sp in specs:  # one row at a time: a GPU holds one 7B training run comfortably, not five
                p = _Proc(sp, env)
                procs = [p]
                try:
                    results[sp["key"]].update(p.recv())
                    bar.update(1)
                    for _ in range(steps):
                        record(p, p.ask("step"))
                        bar.update(1)
                    results[sp["key"]].update(p.ask("memory"))
                    if device.type == "cpu" and not args.no_live:
                        results[sp["key"]].update(p.ask("live"))
                except Exception as e:
                    fail(p, e)
                finally:
                    p.close()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except KeyboardInterrupt:  # e.g. a time limit: keep the rows already measured
        interrupted = True
        print(f"\n[mgpo-bench] interrupted during r={rank}; writing the rows done", file=sys.stderr)
        for p in procs:
            if p.p.poll() is None:
                p.p.kill()
    finally:
        for p in procs:
            p.close()
    for r in results.values():
        if interrupted and not r.get("peak_rss"):
            r.setdefault("error", "interrupted")
    bar.close()
    out = []
    for r in rows:
        res = results[r["key"]]
        if res["times"]:
            res.update(summarize(res["times"]))
            res["fwd_bwd_median_ms"] = 1e3 * percentile(res["t_fwd_bwd"], 50)
            res["opt_median_ms"] = 1e3 * percentile(res["t_opt"], 50)
            res["host_syncs_per_step"] = percentile(res["host_syncs"], 50)
        out.append(res)
    return out


def _mem_key(device: torch.device) -> str:
    return "peak_allocated" if device.type == "cuda" else "peak_live"


def add_ratios(rows: List[Dict[str, Any]], device: torch.device, preset: str, cfg: Dict[str, Any]) -> None:
    base = next((r for r in rows if r["key"] == "lora" and "median_ms" in r), None)
    mk = _mem_key(device)
    for r in rows:
        if base is None or "median_ms" not in r:
            continue
        r["time_ratio_of_medians"] = r["median_ms"] / base["median_ms"]
        r["time_ratio"] = r["time_ratio_of_medians"]
        if device.type == "cpu" and len(r["times"]) == len(base["times"]):
            # steps were interleaved round by round: the ratio within each round cancels the machine's drift
            paired = paired_quantiles(r["times"], base["times"])
            r["time_ratio"] = paired["median"]
            r["time_ratio_p20"], r["time_ratio_p80"] = paired["p20"], paired["p80"]
        if r.get(mk) and base.get(mk):
            r["mem_ratio"] = r[mk] / base[mk]
        if r.get("peak_rss") and base.get("peak_rss"):
            r["rss_ratio"] = r["peak_rss"] / base["peak_rss"]
        if preset == "llama2-7b":
            steps = math.ceil(WIZARDLM_SAMPLES / (cfg["micro_batch"] * cfg["accum"]))
            r["epoch_steps"] = steps
            r["projected_epoch_s"] = steps * r["median_ms"] / 1e3


def _hm(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    m = int(round(seconds / 60))
    return f"{m // 60}h {m % 60:02d}min"


def markdown_rank(rank: int, rows: List[Dict[str, Any]], device: torch.device) -> str:
    cuda = device.type == "cuda"
    headers = ["Method", "#Params", "Peak memory" + (" (allocated)" if cuda else " (live tensors)"), "× LoRA"]
    if not cuda:
        headers += ["Peak RSS", "× LoRA"]
    headers += ["Time / step", "p20–p80", "× LoRA", "fwd+bwd", "clip+opt", "host syncs / step",
                "Projected epoch"]
    body = []
    mk = _mem_key(device)
    for r in rows:
        if "median_ms" not in r:
            err = str(r.get("error", "failed")).splitlines()[0]
            body.append([r["method"], "interrupted" if err == "interrupted" else f"failed: {err[:60]}"]
                        + [None] * (len(headers) - 2))
            continue
        row = [r["method"], f"{r['params'] / 1e6:.2f}M", C.fmt_bytes(r.get(mk)), C.fmt(r.get("mem_ratio"), 3)]
        if not cuda:
            row += [C.fmt_bytes(r.get("peak_rss")), C.fmt(r.get("rss_ratio"), 3)]
        ratio = C.fmt(r.get("time_ratio"), 3)
        if r.get("time_ratio_p20") is not None and r["key"] != "lora":
            ratio += f" ({r['time_ratio_p20']:.3f}–{r['time_ratio_p80']:.3f})"
        row += [f"{r['median_ms'] / 1e3:.3f} s", f"{r['p20_ms'] / 1e3:.3f}–{r['p80_ms'] / 1e3:.3f}",
                ratio, f"{r['fwd_bwd_median_ms'] / 1e3:.3f} s",
                f"{r['opt_median_ms']:.1f} ms", C.fmt(r.get("host_syncs_per_step"), 0),
                _hm(r.get("projected_epoch_s"))]
        body.append(row)
    return f"## r = {rank}\n\n" + C.md_table(headers, body)


def paper_md() -> str:
    p = PAPER_TABLE3
    mr = p["LoRA-MGPO"]["memory_gb"] / p["LoRA"]["memory_gb"]
    tr = p["LoRA-MGPO"]["time_s"] / p["LoRA"]["time_s"]
    return ("The paper's Table 3 (LLaMA-2-7B, r=128, one epoch of 52k WizardLM samples, NVIDIA H20 96GB; the "
            "authors' procedure):\n\n" + C.md_table(
                ["Method", "#Params", "Memory Cost", "× LoRA", "Training Time", "× LoRA"],
                [["LoRA", "320M", "81.73 GB", "1.000", "5h 48min", "1.000"],
                 ["LoRA-MGPO", "320M", "90.56 GB", f"{mr:.3f}", "6h 52min", f"{tr:.3f}"]]))


NOTES = """
How this was measured: each row is a fresh process running real training steps of a `transformers`
LlamaForCausalLM ({shape}) with `peft` LoRA (alpha {alpha}, all linear layers, fp32 adapters), random token ids,
micro-batch {mb} × {accum} accumulation, seq {seq}, cosine schedule with {wr:.0%} warm-up, clip to {mgn}; {steps}
timed optimizer steps per row after {warmup} untimed. *Time / step* is the median wall time of a whole optimizer
step (all micro-batches, clip, optimizer, scheduler; one `.item()` of the loss per step in every row); *fwd+bwd*
and *clip+opt* split it. {ratiohow} {memhow} *host syncs / step* counts the `.item()` calls of the loop and the authors'
procedure (2 per LoRA layer per micro-batch); MGPO's step itself has none. {interleave}
"""


def chart(payload: Dict[str, Any], path) -> None:
    plt = charts.pyplot()
    per_rank = payload["results"]
    keys = [r["key"] for r in per_rank[0]["rows"]]
    names = {r["key"]: r.get("short", r["method"]) for r in per_rank[0]["rows"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.8 + 0.7 * len(keys) * len(per_rank)))
    for ax, field, title in ((axes[0], "time_ratio", "time per optimizer step / LoRA"),
                             (axes[1], "mem_ratio", "peak memory / LoRA")):
        charts.ratio_bars(ax, per_rank, keys, names, field, fontsize=7, value_labels=True)
        ax.set_title(title)
        ax.legend(fontsize=7, loc="lower right")
    if payload["preset"] == "llama2-7b" or payload["device"].startswith("cuda"):
        p = PAPER_TABLE3
        axes[0].axvline(p["LoRA-MGPO"]["time_s"] / p["LoRA"]["time_s"], color="r", ls="--", lw=0.8,
                        label="paper's LoRA-MGPO")
        axes[1].axvline(p["LoRA-MGPO"]["memory_gb"] / p["LoRA"]["memory_gb"], color="r", ls="--", lw=0.8)
    fig.suptitle(f"Table 3 side by side: {payload['preset']} preset on {payload['device']}", fontsize=10)
    charts.save(fig, plt, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="default: scaled-down Llama for a CPU; llama2-7b: the paper's setting (a GPU); tiny: tests")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks (preset's by default)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps per row first")
    for name in ("hidden", "intermediate", "layers", "heads", "kv-heads", "vocab", "seq", "micro-batch", "accum"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset's value")
    p.add_argument("--base-dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="frozen base weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--grad-ckpt", action="store_true",
                   help="gradient checkpointing (off by default; the paper does not say)")
    p.add_argument("--backends", nargs="*", default=None, help="our MGPO backends to run (default: all usable)")
    p.add_argument("--rows", nargs="*", default=None,
                   help="only these rows (lora, authors, mgpo-<backend>); lora is always kept as the reference")
    p.add_argument("--sequential", action="store_true",
                   help="run the rows one after another (the default on CUDA) instead of interleaving their steps")
    p.add_argument("--no-live", action="store_true", help="CPU: skip the instrumented step (peak live tensors)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def run(args) -> Dict[str, Any]:
    device = C.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(PRESETS[args.preset])
    for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "seq", "micro_batch", "accum",
              "ranks", "steps", "warmup", "base_dtype"):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    if cfg["base_dtype"] == "auto":
        cfg["base_dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    backends, usable, reasons = choose_backends(device, args.backends)
    rows = row_specs(backends)
    if args.rows:
        valid = [r["key"] for r in rows]
        bad = [k for k in args.rows if k not in valid]
        if bad:
            raise SystemExit(f"--rows: unknown {bad}; valid here: {valid}")
        rows = [r for r in rows if r["key"] in args.rows or r["key"] == "lora"]
    payload: Dict[str, Any] = {
        **C.run_record("table3", device, backends, usable, reasons), "preset": args.preset, "config": cfg,
        "hparams": {"lr": LR, "warmup_ratio": WARMUP_RATIO, "rho": RHO, "beta1_mgpo": BETA1_MGPO,
                    "ema_beta": EMA_BETA, "lora_alpha": args.lora_alpha, "max_grad_norm": args.max_grad_norm,
                    "grad_ckpt": args.grad_ckpt},
        "paper_table3": PAPER_TABLE3, "results": [],
    }
    for rank in cfg["ranks"]:
        try:
            res = run_rank(rank, cfg, rows, device, args, progress=not args.no_progress)
        except KeyboardInterrupt:
            payload["interrupted"] = f"interrupted during r={rank}"
            break
        add_ratios(res, device, args.preset, cfg)
        payload["results"].append({"rank": rank, "rows": res})
        if any(r.get("error") == "interrupted" for r in res):
            payload["interrupted"] = f"interrupted during r={rank}"
            break
    if not payload["results"]:
        raise SystemExit("no rank finished")
    payload["loadavg_at_end"] = C.load_average()

    shape = (f"hidden {cfg['hidden']}, MLP {cfg['intermediate']}, {cfg['layers']} layers, {cfg['heads']} heads, "
             f"vocab {cfg['vocab']}, {cfg['base_dtype']} base, random weights")
    if device.type == "cuda":
        memhow = ("*Peak memory* is `torch.cuda.max_memory_allocated` over the row's steps (model, adapters, "
                  "optimizer state, activations; the allocator's cache is not counted).")
        inter = "Rows run one after another on the GPU."
        ratiohow = "Time *× LoRA* is the ratio of the medians."
    else:
        memhow = ("*Peak memory (live tensors)* is the peak of live tensor bytes over one instrumented step: the "
                  "bytes of every tensor reachable by Python's gc at the step boundary plus the running sum of "
                  "the CPU allocator's allocation/free events that `torch.profiler(profile_memory=True)` recorded "
                  "during the step (so C++ extension ops count too). *Peak RSS* is the process's `ru_maxrss` "
                  "over the timed steps (it includes the Python/torch libraries, the same in every row, and "
                  "glibc's cached free memory).")
        ratiohow = ("Time *× LoRA* is the median (p20–p80) over rounds of the step's time over the LoRA row's "
                    "step in the same round.")
        inter = ("All rows' processes are alive together and their steps are interleaved round-robin, one "
                 "process running at a time, so drift of the shared machine hits all rows alike.")
    md = C.report_heading(f"LoRA vs LoRA-MGPO end to end ({args.preset} preset, {device})", payload)
    md += "\n".join(markdown_rank(r["rank"], r["rows"], device) for r in payload["results"])
    md += NOTES.format(shape=shape, alpha=args.lora_alpha, mb=cfg["micro_batch"], accum=cfg["accum"],
                       seq=cfg["seq"], wr=WARMUP_RATIO, mgn=args.max_grad_norm, steps=cfg["steps"],
                       warmup=cfg["warmup"], memhow=memhow, interleave=inter, ratiohow=ratiohow)
    if args.preset == "llama2-7b":
        md += (f"*Projected epoch* = median step time × {math.ceil(WIZARDLM_SAMPLES / (cfg['micro_batch'] * cfg['accum']))}"
               f" steps ({WIZARDLM_SAMPLES} samples / effective batch {cfg['micro_batch'] * cfg['accum']}), every "
               "sample a full sequence (an upper bound for real, shorter samples).\n")
    md += "\n" + paper_md()
    name = args.name or (f"table3-{args.preset}-r" + "-".join(map(str, cfg["ranks"])))
    want_chart = not args.no_chart and any("time_ratio" in r for res in payload["results"] for r in res["rows"])
    return C.publish(args.out_dir, device, name, payload, md, chart if want_chart else None)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
    else:
        from . import main

        raise SystemExit(main(["table3"] + sys.argv[1:]))
