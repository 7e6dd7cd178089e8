#!/usr/bin/env bash
# The GPU run in stages, each ONE call of the device tool that ends well inside its 600 s limit and cannot lose
# what it measured (README: "A session lent a GPU"):
#   bash bench/gpu_wheels.sh        here, first: peer wheels + .whl/GIT_COMMIT (the device copy may lack .git)
#   run(command="bash bench/run_gpu.sh tests", carry=[".whl"], timeout_s=600)    gpu-marked tests + backend smoke
#   run(command="bash bench/run_gpu.sh kernels", carry=[".whl"], timeout_s=600)  bench_linear_logprobs.py per head
#   run(command="bash bench/run_gpu.sh losses", carry=[".whl"], timeout_s=600)   bench_dpo_loss.py, bench_nn_count.py
#   run(command="bash bench/run_gpu.sh e2e", carry=[".whl"], timeout_s=600)      bench/bench_e2e_dpo.py (vs TRL)
#   run(command="bash bench/run_gpu.sh peers", carry=[".whl"], timeout_s=600)    the Liger / Cut Cross-Entropy rows
#   bash bench/run_gpu.sh all       every stage in turn (local use: longer than one device call)
# usage: bash bench/run_gpu.sh STAGE [ARGS...]   (ARGS go to the stage's bench scripts)
#
# A stage writes three files into $OUT (default runs/gpu, git-ignored), all as it goes:
#   gpu-STAGE.log          everything printed, through tee (never tail), Python unbuffered
#   gpu-STAGE.jsonl        one JSON object per line: the stage's environment (nvidia-smi, versions, date, git
#                          commit), each step's {"kind": "step", rc, seconds, timed_out}, each test's outcome,
#                          the smoke rows and the bench scripts' own rows (--jsonl), "missing" rows
#   gpu-STAGE-files.tar.gz the bench scripts' JSON/PNG (--out), refreshed after each bench step
# Every step runs under its own `timeout`, capped so the stage ends inside FASTALIGN_GPU_STAGE_BUDGET (540 s);
# a step that fails or times out is recorded and the next one runs. A missing script, flag or peer wheel is a
# "missing" row, not a failure. Exit status: 0 when every step that ran exited 0, 1 otherwise, 2 bad usage.
#
# Environment: OUT; FASTALIGN_GPU_DRYRUN=1 (tiny shapes, CPU: the plumbing, tested by tests/test_gpu_stages.py);
# FASTALIGN_GPU_STEP_TIMEOUT caps every step's timeout; FASTALIGN_GPU_TIMEOUT_<step> sets one step's (other
# characters than letters, digits, _ as _: FASTALIGN_GPU_TIMEOUT_gpu_tests=500); FASTALIGN_GPU_STAGE_BUDGET (s);
# FASTALIGN_GPU_HEADS (the kernels stage's heads, one step each; ARGS instead run one step with them); FASTALIGN_GIT_COMMIT (else
# `git rev-parse HEAD`, else .whl/GIT_COMMIT written by bench/gpu_wheels.sh); PYTHON (default python3);
# FASTALIGN_GPU_CPP=1 lets the C++ extension JIT-build there (off: minutes of compiling for a CPU-only backend);
# FASTALIGN_GPU_PEER_ONLY (--only of the peers stage's bench_linear_logprobs, default "Liger,CCE"); FASTALIGN_GPU_WHEELS=1 installs
# .whl/ in a dry run too; FASTALIGN_GPU_WHEEL_DIR (default .whl).
#
# The device has torch, triton, transformers and peft but no network and no fastalign install: the package runs
# from a copy where kernels/ sits at fastalign/kernels (what `pip install` does); peers come from .whl/.
set -uo pipefail
STAGES="tests kernels losses e2e peers"
STAGE=${1:-}
shift || true
EXTRA=("$@")
case " $STAGES all " in
    *" $STAGE "*) ;;
    *) echo "usage: bash bench/run_gpu.sh {${STAGES// /|}|all} [ARGS...]; got stage '$STAGE'" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/runs/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
LOG=$OUT/gpu-$STAGE.log
JSONL=$OUT/gpu-$STAGE.jsonl
TARBALL=$OUT/gpu-$STAGE-files.tar.gz
PY=${PYTHON:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # steps run in the work copy
DRY=${FASTALIGN_GPU_DRYRUN:-0}
[ "$DRY" = 0 ] && DRY= || true
if [ "$STAGE" = all ]; then BUDGET=${FASTALIGN_GPU_STAGE_BUDGET:-3000}; else BUDGET=${FASTALIGN_GPU_STAGE_BUDGET:-540}; fi
STEP_CAP=${FASTALIGN_GPU_STEP_TIMEOUT:-}
START=$SECONDS
FAILED=0
export PYTHONUNBUFFERED=1 FASTALIGN_GPU_JSONL=$JSONL

log() { echo "[run_gpu $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
row() { echo "$1" >>"$JSONL"; }
json_str() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "${s//$'\n'/ }"; }
missing() {  # missing WHAT WHY: recorded, not a failure
    log "MISSING $1: $2"
    row "{\"kind\": \"missing\", \"stage\": \"$STAGE\", \"what\": $(json_str "$1"), \"why\": $(json_str "$2")}"
}

# step NAME TIMEOUT_S CMD...: runs CMD under timeout (capped by FASTALIGN_GPU_STEP_TIMEOUT and what is left of
# the stage's budget), its output through tee into the log, and records its exit status as a JSONL row.
step() {
    local name=$1 limit=$2 t0=$SECONDS rc timed_out=false
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 10)) override="FASTALIGN_GPU_TIMEOUT_${name//[^A-Za-z0-9_]/_}"
    limit=${!override:-$limit}
    if [ -n "$STEP_CAP" ] && [ "$STEP_CAP" -lt "$limit" ]; then limit=$STEP_CAP; fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$left" -lt 5 ]; then
        log "SKIP $name: the stage's budget (${BUDGET}s) is spent"
        row "{\"kind\": \"step\", \"stage\": \"$STAGE\", \"step\": \"$name\", \"rc\": null, \"skipped\": \"budget spent\"}"
        FAILED=$((FAILED + 1))
        return 1
    fi
    log "=== step $name (timeout ${limit}s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then timed_out=true; fi
    row "{\"kind\": \"step\", \"stage\": \"$STAGE\", \"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timeout_s\": $limit, \"timed_out\": $timed_out}"
    log "=== step $name: rc=$rc in $((SECONDS - t0))s$([ $timed_out = true ] && echo ' (TIMED OUT)')"
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
    return "$rc"
}

# bench NAME TIMEOUT_S SCRIPT [ARGS...]: a bench script under the contract (--jsonl, --out, dry run); a missing
# script or flag is recorded and the stage goes on.
bench() {
    local name=$1 limit=$2 script=$3
    shift 3
    if [ ! -f "$W/$script" ]; then missing "$script" "not in this checkout"; return 0; fi
    local before
    before=$(wc -l <"$LOG")
    step "$name" "$limit" "$PY" "$script" --jsonl "$JSONL" --out "$W/results" "$@" ${EXTRA[@]+"${EXTRA[@]}"}
    local rc=$?
    if [ "$rc" = 2 ] && tail -n +"$((before + 1))" "$LOG" | grep -q "unrecognized arguments"; then
        missing "$script $(tail -n +"$((before + 1))" "$LOG" | grep -o 'unrecognized arguments:.*' | head -1)" \
            "the script does not take these arguments (the bench contract: --jsonl PATH, --out DIR); a failed step"
    fi
    # the bench's JSON/PNG files, refreshed after every bench step so a later kill keeps them
    if [ -d "$W/results" ] && [ -n "$(ls -A "$W/results")" ]; then
        tar -C "$W/results" -czf "$W/files.tar.gz" . && cp "$W/files.tar.gz" "$TARBALL"
    fi
    return 0
}

# wheels: the peers (Liger, Cut Cross-Entropy, TRL and what the image lacks) from .whl/ (bench/gpu_wheels.sh)
wheels() {
    if [ -n "$DRY" ] && [ "${FASTALIGN_GPU_WHEELS:-0}" = 0 ]; then
        log "dry run: .whl/ not installed (FASTALIGN_GPU_WHEELS=1 to do it); peers are what $PY already has"
        return 0
    fi
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        missing "peer wheels ($WHEELS/*.whl)" "run 'bash bench/gpu_wheels.sh' before the call and pass carry=[\".whl\"]; peers will be rows saying they are not installed"
        return 0
    fi
    # the environment step after this one records their versions (FASTALIGN_GPU_SITE)
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$W/site" "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:$W/site" FASTALIGN_GPU_SITE="$W/site"
    return 0
}

# ---- setup: a work copy laid out as installed, the commit, the device --------------------------------------------
: >"$LOG"
: >"$JSONL"
log "stage $STAGE${DRY:+ (dry run)}; OUT=$OUT; budget ${BUDGET}s${STEP_CAP:+; step cap ${STEP_CAP}s}; args: ${EXTRA[*]:-none}"
COMMIT=${FASTALIGN_GIT_COMMIT:-}
if [ -z "$COMMIT" ] && HEAD=$(git -C "$REPO" rev-parse HEAD 2>/dev/null); then
    COMMIT=$HEAD$([ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ] && echo +dirty)
fi
WHEELS=${FASTALIGN_GPU_WHEEL_DIR:-$REPO/.whl}
if [ -z "$COMMIT" ] && [ -f "$WHEELS/GIT_COMMIT" ]; then COMMIT="$(cat "$WHEELS/GIT_COMMIT") (from .whl/GIT_COMMIT)"; fi
export FASTALIGN_GIT_COMMIT=${COMMIT:-unknown}
log "git commit: $FASTALIGN_GIT_COMMIT"

W=$(mktemp -d "${TMPDIR:-/tmp}/fastalign_gpu_$STAGE.XXXXXX") || exit 2
trap 'rm -rf "$W"' EXIT
for p in fastalign kernels csrc tests bench setup.py pyproject.toml; do
    [ -e "$REPO/$p" ] && cp -r "$REPO/$p" "$W/"
done
rm -rf "$W/bench/results"
if [ -d "$W/kernels" ]; then rm -rf "$W/fastalign/kernels" && mv "$W/kernels" "$W/fastalign/kernels"; fi
mkdir -p "$W/results"
cd "$W" || exit 2
export PYTHONPATH=$W
[ "${FASTALIGN_GPU_CPP:-0}" = 1 ] || export FASTALIGN_NO_JIT=1
if nvidia-smi -L >/dev/null 2>&1; then
    unset TRITON_INTERPRET
    export TRITON_DEFAULT_FP_FUSION=1
else
    log "no GPU (nvidia-smi -L fails): triton runs in the CPU interpreter"
    export TRITON_INTERPRET=1
    [ -n "$DRY" ] || log "WARNING: not a dry run and no GPU: the benches will measure the CPU"
fi
export FASTALIGN_GPU_DRYRUN=${DRY:-0}

# ---- the stages ---------------------------------------------------------------------------------------------------
stage_tests() {
    step smoke 120 "$PY" bench/gpu_stages/smoke.py --jsonl "$JSONL"
    # Only the files that hold gpu-marked tests: collecting the whole suite imports every module (slow) and the
    # CPU suite has no business on the GPU machine (CI runs it).
    local files opts=()
    files=$(grep -l "pytest.mark.gpu" tests/test_*.py)
    "$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout=240)
    # shellcheck disable=SC2086
    step gpu-tests 400 "$PY" -m pytest -q -ra -p no:cacheprovider -p bench.gpu_stages.pytest_jsonl -m gpu \
        ${opts[@]+"${opts[@]}"} $files
}
stage_kernels() {
    if [ ${#EXTRA[@]} -gt 0 ]; then bench bench_linear_logprobs 480 bench/bench_linear_logprobs.py; return; fi
    # one step per model head (each with its own JSON/PNG tag): a head whose autotuning runs long cannot starve
    # the others, and a kill loses one head at most
    for head in ${FASTALIGN_GPU_HEADS:-llama3-8b qwen2.5-0.5b gemma2-2b}; do
        bench "kernels_$head" 170 bench/bench_linear_logprobs.py --heads "$head" --tag "$head"
    done
}
stage_losses() {
    bench bench_dpo_loss 480 bench/bench_dpo_loss.py
    # the clone-robust weights' op (issue 8's GPU figures): triton vs the torch baseline, one timed run per row
    bench bench_nn_count 90 bench/bench_nn_count.py --repeats 1
}
stage_e2e() { bench bench_e2e_dpo 460 bench/bench_e2e_dpo.py; }
stage_peers() {
    # the peers' variants only (naive always runs: the baseline of the ratios); the DPO-loss bench is small whole
    bench peers_linear_logprobs 300 bench/bench_linear_logprobs.py --only "${FASTALIGN_GPU_PEER_ONLY:-Liger,CCE}"
    bench peers_dpo_loss 200 bench/bench_dpo_loss.py
}

case $STAGE in e2e | peers | all) wheels ;; esac
step environment 90 "$PY" bench/gpu_stages/environment.py --stage "$STAGE" --jsonl "$JSONL"
if [ "$STAGE" = all ]; then
    for s in $STAGES; do log "##### stage $s"; "stage_$s"; done
else
    "stage_$STAGE"
fi
log "stage $STAGE done in $((SECONDS - START))s: $FAILED step(s) failed or timed out; files:"
ls -la "$OUT" | tee -a "$LOG"
[ "$FAILED" = 0 ]
