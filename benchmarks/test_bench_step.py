"""The optimizer-step cases of ``mgpo-bench step`` under pytest-benchmark, plus smoke tests of ``mgpo-bench``.

    pytest benchmarks --benchmark-only                                   # small by default (1 layer, r=8)
    MGPO_BENCH_LAYERS=32 MGPO_BENCH_RANKS=8,32,128 pytest benchmarks --benchmark-only --benchmark-json=out.json
    pytest benchmarks --benchmark-only --benchmark-compare               # against the last saved run

Cases are grouped per shape set (layers, rank).  Environment: MGPO_BENCH_LAYERS (default 1), MGPO_BENCH_RANKS
(default 8), MGPO_BENCH_DEVICE (default cuda if present, else cpu), MGPO_BENCH_ROUNDS (default 30 CUDA, 10 CPU),
MGPO_BENCH_THREADS (CPU torch threads, default 1).
No test asserts on timings; they check only that every step leaves finite parameters.
"""
import json
import os

import pytest
import torch

from mgpo_kernels.bench import common as C
from mgpo_kernels.bench import step as S
from mgpo_kernels.bench.backend_choice import backend_lists, default_backends
from mgpo_kernels.bench.shapes import lora_shapes, numel
from mgpo_kernels.bench.tensors import params_sharing_grads, refill

DEVICE = torch.device(os.environ.get("MGPO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
LAYERS = int(os.environ.get("MGPO_BENCH_LAYERS", "1"))
RANKS = [int(r) for r in os.environ.get("MGPO_BENCH_RANKS", "8").split(",") if r.strip()]
ROUNDS = int(os.environ.get("MGPO_BENCH_ROUNDS", "30" if DEVICE.type == "cuda" else "10"))
BACKENDS = default_backends(backend_lists(DEVICE)[0], DEVICE)
KEYS = list(S.method_factories(BACKENDS))
if DEVICE.type == "cpu":  # one thread: a busy shared machine cannot stall OpenMP barriers (see mgpo-bench --help)
    torch.set_num_threads(int(os.environ.get("MGPO_BENCH_THREADS", "1")))


@pytest.fixture(scope="module", params=RANKS, ids=lambda r: f"r{r}")
def shape_set(request):
    rank = request.param
    shapes = lora_shapes(LAYERS, rank)
    gen = torch.Generator(device=DEVICE).manual_seed(rank)
    grads = [torch.empty(s, device=DEVICE) for s in shapes]
    refill(grads, gen)
    flush = torch.empty((64 << 20) // 4, device=DEVICE)
    return {"rank": rank, "shapes": shapes, "grads": grads, "gen": gen, "flush": flush, "n": numel(shapes)}


@pytest.mark.parametrize("key", KEYS)
def test_step(benchmark, shape_set, key):
    ss = shape_set
    params = params_sharing_grads(ss["shapes"], DEVICE, torch.Generator(device=DEVICE).manual_seed(1), ss["grads"])
    m = S.method_factories(BACKENDS)[key](params)
    benchmark.group = f"LLaMA-2-7B LoRA, {LAYERS} layer(s), r={ss['rank']}, {ss['n'] / 1e6:.2f}M params, {DEVICE.type}"
    benchmark.name = m.name
    benchmark.extra_info.update(method=m.name, key=key, rank=ss["rank"], layers=LAYERS, params=ss["n"],
                                passes=m.passes, bytes=m.passes * 4 * ss["n"], device=str(DEVICE))

    def setup():
        refill(ss["grads"], ss["gen"])  # fresh random gradients, untimed
        ss["flush"].fill_(1.0)
        C.sync(DEVICE)

    def run():
        m.step()
        C.sync(DEVICE)

    for _ in range(2):  # state allocation, compilation
        setup()
        run()
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert all(torch.isfinite(p).all() for p in params)


# ------------------------------------------------------------------------------- smoke tests of the command


def test_cli_step_smoke(tmp_path):
    from mgpo_kernels.bench import main

    assert main(["step", "--device", "cpu", "--ranks", "2", "4", "--layers", "1", "--reps", "2", "--warmup", "1",
                 "--out-dir", str(tmp_path), "--name", "smoke", "--no-progress"]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md", "png"], files
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    keys = {r["key"] for r in payload["results"][0]["rows"]}
    assert {"adamw-foreach", "adamw-fused", "clip+adamw-fused", "naive-mgpo", "naive-mgpo+clip"} <= keys
    assert {f"mgpo-{b}" for b in BACKENDS if DEVICE.type == "cpu"} <= keys
    for res in payload["results"]:
        for r in res["rows"]:
            assert r["median_ms"] > 0 and r["GBps"] > 0 and r["passes"] in (7, 8, 9)
            assert r["extra_state_B_per_param"] < 1.0  # nobody keeps a copy of the parameters
    md = next(tmp_path.glob("*.md")).read_text()
    assert "× fused AdamW" in md and "![chart]" in md


def test_cli_table3_smoke(tmp_path):
    from mgpo_kernels.bench import main

    assert main(["table3", "--device", "cpu", "--preset", "tiny", "--steps", "1", "--warmup", "1",
                 "--out-dir", str(tmp_path), "--name", "smoke", "--no-progress"]) == 0
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {r["key"]: r for r in payload["results"][0]["rows"]}
    assert {"lora", "authors"} <= set(rows)
    for key, r in rows.items():
        assert "error" not in r, (key, r.get("error"))
        assert r["params"] > 0 and r["peak_live"] > 0 and r["peak_rss"] > 0 and r["median_ms"] > 0
        assert abs(r["live_after"] - r["live_after_from_events"]) < 0.05 * r["live_after"], key
    assert rows["authors"]["host_syncs_per_step"] > rows["lora"]["host_syncs_per_step"]
    assert len({r["params"] for r in rows.values()}) == 1  # same trainable parameters in every row


def test_authors_procedure_restores_weights():
    """The authors' procedure leaves W0 where it found it (fp32) and perturbs it in between."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from mgpo_kernels.bench.authors_procedure import AuthorsProcedure

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, use_cache=False)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    proc = AuthorsProcedure(model, opt, rho=0.05, beta=0.8)
    assert len(proc.layers) == 7
    ids = torch.randint(0, 64, (2, 8))
    for step in range(3):
        w0 = [mod.base_layer.weight.detach().clone() for mod, *_ in proc.layers]
        proc.before_forward()
        moved = max((mod.base_layer.weight - w).abs().max().item() for (mod, *_), w in zip(proc.layers, w0))
        assert (moved > 0) == (step > 0)  # no momentum before the first optimizer step
        model(input_ids=ids, labels=ids).loss.backward()
        proc.after_backward()
        for (mod, *_), w in zip(proc.layers, w0):
            torch.testing.assert_close(mod.base_layer.weight, w, rtol=0, atol=1e-6)
        opt.step()
        opt.zero_grad()
    assert all(g > 0 for g in proc.gbar) and proc.host_syncs == 7 + 2 * (7 + 7)  # 3 micro-batches, no |D| in the first
