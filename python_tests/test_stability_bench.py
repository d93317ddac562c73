"""The stability study's parts (experiments/stability, outside the package): task data, exact match, the bump
metric, the random-noise baseline's norm, and a two-step pre-training + fine-tuning run through its command line."""
from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest
import torch

# experiments/ lives at the repository root, not in the installed package: importable whether pytest runs as
# `python -m pytest` (the working directory is on sys.path) or as `pytest python_tests` (only python_tests/ is)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from experiments.stability import metrics, task  # noqa: E402
from experiments.stability.noise import IsotropicNoise  # noqa: E402
from mgpo_kernels import MGPO  # noqa: E402


def _solve(q: str) -> int:
    n = [int(x) for x in re.findall(r"\d+", q)]
    if "more" in q:
        return n[0] + n[1]
    if "left" in q:
        return n[0] - n[1]
    if "boxes" in q:
        return n[0] * n[1]
    assert "equally" in q
    assert n[0] % n[1] == 0
    return n[0] // n[1]


def test_task_splits_are_deterministic_disjoint_and_correct():
    seed = int(torch.randint(0, 10_000, ()))
    tr1, ev1 = task.make_splits(300, 60, seed=seed)
    tr2, ev2 = task.make_splits(300, 60, seed=seed)
    assert tr1 == tr2 and ev1 == ev2
    tr3, _ = task.make_splits(300, 60, seed=seed + 1)
    assert tr3 != tr1
    assert not {p.question for p in ev1} & {p.question for p in tr1}
    assert len({p.question for p in ev1}) == len(ev1)
    for p in tr1 + ev1:
        assert p.answer == _solve(p.question) and p.answer >= 0
        assert p.prompt.endswith("\nAnswer:") and p.target == f" {p.answer}\n"


def test_collate_masks_prompt_and_padding():
    ex = [([5, 6, 7, 8], 2), ([5, 6, 7], 1)]
    b = task.collate(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 7, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7, 8], [-100, 6, 7, -100]]


def test_exact_match_needs_every_answer_token_and_ignores_the_prompt():
    vocab, n, plen = 11, 9, 4
    ids = torch.randint(2, vocab, (3, n))
    labels = ids.clone()
    labels[:, :plen] = -100
    labels[2, -2:] = -100                      # a shorter example (right padding)
    logits = torch.randn(3, n, vocab)
    # make the argmax at position i predict token i+1 everywhere (a perfect model) ...
    logits[:, :-1].scatter_(2, ids[:, 1:, None], 50.0)
    ok, ce, cnt = task.answer_scores(logits, labels)
    assert ok.tolist() == [True, True, True]
    assert cnt.tolist() == [n - plen, n - plen, n - plen - 2]
    # ... then break a prompt position of example 0 (no effect), an answer position of example 1 (a miss) and a
    # padded position of example 2 (no effect)
    bad = logits.clone()
    bad[0, 1] = torch.randn(vocab)
    bad[0, 1, ids[0, 2]] = -50.0
    j = plen + 1
    bad[1, j - 1] = 0.0
    bad[1, j - 1, (ids[1, j] + 1) % vocab] = 50.0
    bad[2, n - 2] = 0.0
    bad[2, n - 2, (ids[2, n - 1] + 1) % vocab] = 50.0
    ok, ce, _ = task.answer_scores(bad, labels)
    assert ok.tolist() == [True, False, True]
    ref = torch.nn.functional.cross_entropy(bad[1, :-1], labels[1, 1:], ignore_index=-100, reduction="sum")
    assert float(ce[1]) == pytest.approx(float(ref), rel=1e-5)


def test_bump_on_synthetic_curves():
    lo = float(torch.rand(())) + 0.5
    down = [3.0 - 2.0 * i / 99 for i in range(100)]
    assert metrics.bump(down, 1) == 0.0 and metrics.bump(down, 10) == 0.0
    rise = float(torch.rand(())) + 0.2
    # down to lo, up by `rise`, down again below lo: the bump is the rise (no smoothing)
    curve = [3 - (3 - lo) * i / 40 for i in range(41)] + [lo + rise * i / 20 for i in range(1, 21)] + \
            [lo + rise - (rise + 0.3) * i / 40 for i in range(1, 41)]
    assert metrics.bump(curve, 1) == pytest.approx(rise, rel=1e-9)
    sm = metrics.bump(curve, 9)
    assert 0.5 * rise < sm < rise
    # smoothing takes most of the noise out of a flat noisy curve
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    noisy = (1.0 + 0.1 * torch.randn(400, generator=g)).tolist()
    assert metrics.bump(noisy, 50) < 0.5 * metrics.bump(noisy, 1)
    assert metrics.bump(curve[:30] + [math.nan], 5) == math.inf
    assert metrics.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_mean_std():
    s = metrics.mean_std([1.0, 3.0, math.nan, None])
    assert s == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2}
    assert metrics.mean_std([math.inf])["mean"] is None


@pytest.mark.parametrize("adaptive_norm", [True, False])
def test_noise_norm_equals_mgpo_epsilon_norm(adaptive_norm):
    shapes = [(7, 5), (13,), (3, 4, 2)]
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    qs = [p.detach().clone().requires_grad_(True) for p in ps]
    opt = MGPO(ps, lr=1e-2, weight_decay=0.0, rho=0.05, ema_beta=0.9, adaptive_norm=adaptive_norm)
    noise = IsotropicNoise(qs, rho=0.05, ema_beta=0.9, adaptive_norm=adaptive_norm,
                           generator=torch.Generator().manual_seed(int(torch.randint(0, 1000, ()))))
    assert noise.norm() == 0.0
    for t in range(6):
        scale = 0.5 + 4.5 * float(torch.rand(()))
        grads = [scale * torch.randn(s) / 5 for s in shapes]
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.apply_perturbation()
        opt.step()
        noise.observe()
        # MGPO's ε, read through the public API: the weights with ε applied minus the weights at rest (θ)
        theta = [p.detach().clone() for p in ps]
        opt.apply_perturbation()
        eps = torch.sqrt(sum(((p.detach() - a) ** 2).sum() for a, p in zip(theta, ps)))
        opt.eval()
        opt.train()
        assert noise.norm() == pytest.approx(float(eps), rel=1e-4)
        # the noise's own move has that norm and is removed exactly
        before = [q.detach().clone() for q in qs]
        noise.apply()
        moved = torch.sqrt(sum(((q.detach() - b) ** 2).sum() for q, b in zip(qs, before)))
        assert float(moved) == pytest.approx(noise.norm(), rel=1e-4)
        noise.remove()
        assert all(torch.equal(q.detach(), b) for q, b in zip(qs, before))


def test_two_step_pretraining_and_finetuning_smoke(tmp_path):
    from experiments.stability import main

    argv = ["--preset", "tiny", "--device", "cpu", "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-chart"]
    assert main(argv + ["--seeds", "2", "--methods", "lora", "mgpo", "noise", "mgpo-neg"]) == 0
    (js,) = (tmp_path / "out").glob("*stability-tiny.json")
    res = json.loads(js.read_text())
    assert not res["base"]["cached"] and res["base"]["config"]["pretrain_steps"] == 2
    assert len(res["runs"]) == 8
    for r in res["runs"]:
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        assert 0.0 <= r["exact_match"] <= 1.0 and math.isfinite(r["eval_loss"])
    by = {(r["method"], r["seed"]): r for r in res["runs"]}
    # same data order and LoRA init per seed: the first step (no perturbation yet anywhere) is identical
    for s in (0, 1):
        assert len({by[(m, s)]["losses"][0] for m in ("lora", "mgpo", "noise", "mgpo-neg")}) == 1
    assert by[("lora", 0)]["losses"][0] != by[("lora", 1)]["losses"][0]
    assert len(res["rows"]) == 4 and (tmp_path / "out" / js.name.replace(".json", ".md")).exists()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # a second run loads the cached base model
    assert main(argv + ["--methods", "lora", "--seeds", "1"]) == 0
    assert json.loads(js.read_text())["base"]["cached"]


def test_stability_is_no_longer_an_mgpo_bench_subcommand():
    from mgpo_kernels.bench import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["stability", "--preset", "tiny"])


def test_report_pairs_each_method_with_lora_on_the_same_seed():
    from experiments.stability import report

    cfg = {"methods": ["lora", "mgpo"], "ranks": [8], "lrs": [1e-3], "seeds": [0, 1, 2], "smooth": 1, "steps": 4}
    base = [3.0, 1.0, 1.0, 1.0]
    runs = []
    rises = [float(x) for x in torch.rand(3) + 0.1]
    for s, rise in enumerate(rises):
        runs.append({"method": "lora", "rank": 8, "lr": 1e-3, "seed": s, "losses": base[:2] + [1.0 + rise, 1.0],
                     "eval_loss": 2.0, "exact_match": 0.1, "diverged": False, "train_s": 1.0})
        # MGPO: no bump on seeds 0 and 1, twice LoRA's on seed 2
        mg = base if s < 2 else base[:2] + [1.0 + 2 * rise, 1.0]
        runs.append({"method": "mgpo", "rank": 8, "lr": 1e-3, "seed": s, "losses": mg, "eval_loss": 2.0 - 0.1 * s,
                     "exact_match": 0.2, "diverged": False, "train_s": 1.0})
    (row,) = report.paired(runs, cfg)
    assert row["pairs"] == 3 and row["lower_bump"] == 2 and row["lower_eval_loss"] == 2
    want = [-rises[0], -rises[1], rises[2]]
    assert row["d_bump"]["mean"] == pytest.approx(sum(want) / 3)
    assert row["d_exact_match"]["mean"] == pytest.approx(10.0)
    (agg,) = [r for r in report.aggregate(runs, cfg) if r["method"] == "lora"]
    assert agg["bump"]["mean"] == pytest.approx(sum(rises) / 3) and agg["final_train_loss"]["mean"] == 1.0


# ------------------------------------------------------------------------------------------------ dose presets
def _rs_by_hand(word: str) -> str:
    table = str.maketrans("abcdefghijklmnopqrstuvwxyz", "bcdefghijklmnopqrstuvwxyza")
    return word[::-1].translate(table)


def test_strings_task_is_deterministic_disjoint_and_correct():
    from experiments.stability import strings

    seed = int(torch.randint(0, 10_000, ()))
    tr1, ev1 = strings.make_splits(300, 80, seed=seed)
    tr2, ev2 = strings.make_splits(300, 80, seed=seed)
    assert tr1 == tr2 and ev1 == ev2
    assert strings.make_splits(300, 80, seed=seed + 1)[0] != tr1
    assert not {e.word for e in ev1} & {e.word for e in tr1} and len({e.word for e in ev1}) == len(ev1)
    for e in tr1 + ev1:
        assert e.tag == "RS" and 4 <= len(e.word) <= 8 and e.word.isalpha() and e.word.islower()
        assert e.prompt == f"RS:{e.word}=" and e.target == _rs_by_hand(e.word) + "\n"
    assert strings.apply_tag("RS", "abyz") == "azcb" and strings.apply_tag("D", "abz") == "zay"
    assert strings.apply_tag("C", "kiwi") == "kiwi" and strings.apply_tag("R", "kiwi") == "iwik"
    # the pre-training mixture holds the four single operations and never the fine-tuning composition
    pre = strings.pretrain_examples(400, seed=seed)
    assert {e.tag for e in pre} == set(strings.PRETRAIN_TAGS) and strings.FINETUNE_TAG not in strings.PRETRAIN_TAGS
    tok = strings.CharTokenizer()
    (ids, plen), = strings.encode(tok, [tr1[0]])
    assert tok.decode(ids) == tr1[0].prompt + tr1[0].target and plen == len(tr1[0].prompt)
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("<eos>") == 1 and len(set(ids)) <= len(tok)


def test_paired_ci_against_a_hand_computation():
    from experiments.stability import dose

    # d = 1, 2, 3, 4, 6: mean 3.2, sd = sqrt(14.8 / 4), t_{0.975, 4} = 2.776, half-width 2.776 sd / sqrt(5)
    half = 2.776 * math.sqrt(14.8 / 4) / math.sqrt(5)
    ci = dose.paired_ci([1.0, 2.0, 3.0, 4.0, 6.0, math.nan, None])
    assert ci["n"] == 5 and ci["mean"] == pytest.approx(3.2) and ci["below"] == 0
    assert ci["lo"] == pytest.approx(3.2 - half, rel=1e-9) and ci["hi"] == pytest.approx(3.2 + half, rel=1e-9)
    assert half == pytest.approx(2.388, abs=1e-3)
    neg = dose.paired_ci([-0.5, 0.1, -0.2])
    assert neg["below"] == 2 and neg["lo"] < neg["mean"] < neg["hi"]
    for df, t in ((1, 12.706), (4, 2.776), (9, 2.262), (30, 2.042), (60, 2.000), (120, 1.980)):
        assert dose.t975(df) == pytest.approx(t, abs=2e-3)
    assert dose.paired_ci([2.0])["mean"] == 2.0 and math.isnan(dose.paired_ci([2.0])["lo"])


def test_choose_cells_takes_the_largest_bump_where_lora_learned():
    from experiments.stability import dose

    def row(r, lr, b, learned):
        return {"rank": r, "lr": lr, "bump": {"mean": b}, "learned": learned}

    rows = [row(8, 1e-2, 0.1, True), row(128, 2e-2, 3.0, False), row(128, 1e-2, 1.2, True),
            row(32, 1e-2, 0.4, True)]
    assert dose.choose_cells(rows, 2) == [(128, 1e-2), (32, 1e-2)]
    assert dose.choose_cells(rows, 1) == [(128, 1e-2)]
    assert dose.choose_cells([row(8, 1e-3, 1.0, False)], 2) == []


@pytest.mark.parametrize("adaptive_norm", [True, False])
def test_recorded_mgpo_eps_norm_is_the_applied_one_and_the_noise_replays_it(adaptive_norm):
    """The noise control's ‖ε‖ per step is MGPO's: mgpo_eps_norm() against ε measured through the public API,
    with gradients small enough that the floor on ḡ acts on some steps."""
    from experiments.stability import dose

    shapes = [(6, 4), (9,)]
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    rho, floor = 0.02, 0.1
    opt = MGPO(ps, lr=1e-2, weight_decay=0.0, rho=rho, ema_beta=0.9, adaptive_norm=adaptive_norm, gbar_floor=floor)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    noise = IsotropicNoise([p.detach().clone() for p in ps], generator=gen)
    floored = 0
    for t in range(8):
        scale = (0.01 if t < 3 else 3.0) * (0.5 + float(torch.rand(())))  # floored first, then not
        for p, s in zip(ps, shapes):
            p.grad = scale * torch.randn(s) / 5
        opt.apply_perturbation()
        opt.step()
        want = dose.mgpo_eps_norm(opt, rho, adaptive_norm, floor)
        floored += adaptive_norm and float(opt.global_state["gbar"]) < floor
        theta = [p.detach().clone() for p in ps]
        opt.apply_perturbation()
        eps = float(torch.sqrt(sum(((p.detach() - a) ** 2).sum() for a, p in zip(theta, ps))))
        opt.eval()
        opt.train()
        assert want == pytest.approx(eps, rel=1e-4)
        before = [q.clone() for q in noise.params]
        noise.apply(want)
        moved = float(torch.sqrt(sum(((q - b) ** 2).sum() for q, b in zip(noise.params, before))))
        assert moved == pytest.approx(want, rel=1e-4) and noise.last_norm == want
        noise.remove()
        assert all(torch.equal(q, b) for q, b in zip(noise.params, before))
    assert floored == (3 if adaptive_norm else 0)
    assert dose.mgpo_eps_norm(opt, 0.0, adaptive_norm, floor) == 0.0


def test_dose_tiny_preset_end_to_end(tmp_path):
    from experiments.stability import main

    argv = ["--preset", "dose-tiny", "--device", "cpu", "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--mgpo-backend", "reference"]
    assert main(argv) == 0
    (js,) = (tmp_path / "out").glob("*stability-dose-tiny.json")
    res = json.loads(js.read_text())
    assert res["benchmark"] == "stability-dose" and res["command"].startswith("python -m experiments.stability")
    assert len(res["scan"]) == 2
    best = max(res["scan_rows"], key=lambda r: r["bump"]["mean"])
    assert [tuple(c) for c in res["cells"]] == [(best["rank"], best["lr"])]
    rank = best["rank"]
    runs = res["runs"]
    assert len(runs) == 2 * (2 + 3)  # 2 seeds x (rho 0 by MGPO and by torch AdamW, MGPO / w/o APN / noise at 0.05)
    by = {(r["seed"], r["variant"], r["rho"]): r for r in runs}
    assert all(r["rank"] == rank for r in runs)
    assert not set(res["scan_seeds"]) & set(res["config"]["seeds"])
    for s in (0, 1):
        # same init and batches for every run of a seed: the first step (eps = 0 everywhere) is identical
        assert len({r["losses"][0] for r in runs if r["seed"] == s}) == 1
        assert all(e == 0.0 for e in by[(s, "mgpo", 0.0)]["eps"])
        mg, nz = by[(s, "mgpo", 0.05)], by[(s, "noise", 0.05)]
        assert mg["eps"][0] == 0.0 and mg["eps"][1] > 0 and nz["eps"] == pytest.approx(mg["eps"], rel=1e-3)
        assert all(e == pytest.approx(0.05) for e in by[(s, "mgpo-noapn", 0.05)]["eps"][1:])
    rows = [r for r in res["dose_rows"] if r["variant"] != "lora"]
    assert len(rows) == 4 and all(r["d_bump"]["n"] == 2 for r in rows)
    (null,) = [r for r in rows if r["variant"] == "adamw"]
    d0 = [by[(s, "adamw", 0.0)]["eval_loss"] - by[(s, "mgpo", 0.0)]["eval_loss"] for s in (0, 1)]
    assert null["rho"] == 0.0 and null["d_eval_loss"]["mean"] == pytest.approx(sum(d0) / 2)
    assert all(e == 0.0 for s in (0, 1) for e in by[(s, "adamw", 0.0)]["eps"])
    (zero,) = [r for r in res["dose_rows"] if r["variant"] == "lora"]
    for r in rows + [zero]:
        want = [x for x in runs if x["variant"] == ("mgpo" if r is zero else r["variant"]) and x["rho"] == r["rho"]]
        assert r["solved"] == sum(x["exact_match"] >= 0.5 for x in want)
    (d,) = res["direction_rows"]
    diffs = [by[(s, "mgpo", 0.05)]["eval_loss"] - by[(s, "noise", 0.05)]["eval_loss"] for s in (0, 1)]
    assert d["n"] == 2 and d["d_eval_loss"]["mean"] == pytest.approx(sum(diffs) / 2)
    out = tmp_path / "out"
    for suffix in ("", "-bump", "-eval-loss", "-exact-match"):
        assert (out / f"{js.stem}{suffix}.png").exists(), suffix
    assert "95% CI" in (out / f"{js.stem}.md").read_text()
