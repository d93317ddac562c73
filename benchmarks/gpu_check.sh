#!/usr/bin/env bash
# One call on a lent GPU machine (an H200; see DEVELOPERS.md and the device tool's README), in about 8 minutes:
#   1. build the extension with that machine's python3 (torch, Triton, transformers, peft are there; no internet),
#   2. the CUDA and Triton tests,
#   3. the end-to-end Table 3 side by side at the paper's setting (LLaMA-2-7B, bf16 base, seq 1024, micro-batch 4
#      x 8 accumulation) at r = 8,
#   4. the optimizer-step benchmark at r = 8, 32, 128 (all 32 layers of LLaMA-2-7B's LoRA tensors),
#   5. compute-sanitizer memcheck and racecheck over benchmarks/sanitizer_smoke.py (if the machine allows it).
# Everything goes under $OUT (the device tool brings back at most 8 files, 2 folder levels):
#   $OUT/gpu_check.log                 every phase's output (tee'd, so a timeout keeps what was printed)
#   $OUT/results/<date>-<gpu>-*.{json,md,png}   the two benchmarks' results (step, table3)
# Each phase is time-boxed (its own cap and the overall budget GPU_CHECK_BUDGET_S, default 500 s); a phase that
# fails or times out does not stop the next one, and the benchmarks write what they finished when interrupted.
#
#   device run:  bash benchmarks/gpu_check.sh          (timeout_s=600)
#   then:        cp <files_at>/results/* benchmarks/results/ && git add benchmarks/results && git commit
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT/results"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-500}"
T0=$(date +%s)
STATUS=()

export PYTHONUNBUFFERED=1 KINETO_LOG_LEVEL=5 TRANSFORMERS_VERBOSITY=error
export TRITON_INTERPRET=0                      # real Triton kernels on the GPU (python_tests' conftest defaults to 1)
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"   # Hopper only: half the nvcc time of 8.0;9.0
export MAX_JOBS="${MAX_JOBS:-16}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the in-place build, without installing anything

elapsed() { echo $(($(date +%s) - T0)); }
log() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$LOG"; }

# phase NAME CAP_SECONDS CMD... : run CMD, output tee'd to the log, killed (SIGINT, then SIGKILL 20 s later) at
# min(CAP, what is left of the budget); skipped when under 20 s are left.
phase() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - $(elapsed)))
    local lim=$((cap < left ? cap : left))
    if ((lim < 20)); then
        log "SKIP $name: ${left}s left of the ${BUDGET_S}s budget"
        STATUS+=("$name: skipped")
        return 0
    fi
    log "BEGIN $name (limit ${lim}s): $*"
    timeout --signal=INT --kill-after=20 "$lim" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?
    log "END $name: rc=$rc$( ((rc == 124)) && echo ' (time limit)')"
    STATUS+=("$name: rc=$rc")
    return 0
}

env_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
        --format=csv || true
    "$PY" - <<'PYEOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
for m in ("triton", "transformers", "peft", "accelerate", "matplotlib", "tqdm", "pytest", "pytest_benchmark"):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:
        print(m, "MISSING:", e)
PYEOF
    command -v nvcc && nvcc --version | tail -2
    git -C "$PWD" log --oneline -1 2>/dev/null || true
}

backends_info() {
    "$PY" -c "import mgpo_kernels as m; print('cuda:', m.backend_reasons('cuda')); print('cpu:', m.backend_reasons('cpu'))"
}

export -f env_info backends_info   # so that `timeout` can run them through bash -c
log "start; OUT=$OUT; budget ${BUDGET_S}s; python3=$(command -v "$PY")"
phase env 60 bash -c env_info
phase build 170 "$PY" setup.py build_ext --inplace
phase backends 60 bash -c backends_info
phase tests 90 "$PY" -m pytest python_tests -q -rs -p no:cacheprovider -k "cuda or triton"
# Table 3 first (the headline); rows: LoRA, the authors' procedure, then our backends (the fused ones first)
phase table3 240 "$PY" -m mgpo_kernels.bench table3 --device cuda --preset llama2-7b --ranks 8 --steps 2 \
    --warmup 1 --out-dir "$OUT/results" --no-progress
phase step 120 "$PY" -m mgpo_kernels.bench step --device cuda --ranks 8 32 128 --reps 30 \
    --out-dir "$OUT/results" --no-progress
# last: compute-sanitizer works on Firecracker machines only (the device library's KINDS.md); a refusal is logged
phase memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/sanitizer_smoke.py
phase racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" benchmarks/sanitizer_smoke.py

log "done in $(elapsed)s"
printf '%s\n' "${STATUS[@]}" | tee -a "$LOG"
ls -la "$OUT" "$OUT/results" | tee -a "$LOG"
exit 0
