#!/usr/bin/env bash
# GPU evidence for the parts of RAPID outside vLLM's worker, in ONE run of at most 9 minutes on the lent H200
# (torch 2.11+cu130, triton 3.6, cuda-bindings 13.3.1, Python 3.12, no vLLM, no network). From the repository root:
#
#     OUT=/path/to/out bash scripts/gpu_evidence.sh
#
# Stage budget in seconds (each stage runs under its own `timeout`: a stage that fails or hangs never blocks the
# next; the whole script stops starting work at TOTAL_BUDGET_S):
#   env         15  versions, nvidia-smi, the device                                       -> env.txt
#   sm_probe    60  SM sets of every green-context split in a fresh process, in both layouts
#                   (disjoint; floors plus a shared pool, whose lanes must meet in the pool
#                   only), eager and as a CUDA graph captured on a green stream and replayed
#                   on the same, the other partition's and a plain stream                   -> sm_probe.json
#   gpu_tests  110  pytest -m gpu on the vLLM-free test files (strict: a fallback fails)    -> gpu_tests.txt
#   profile     75  reduced `vllm-rapid profile` grid on green contexts (32 layers)        -> profile.yaml
#   mechanism  245  the mechanism benchmark at 3 rates, ITL SLO auto (the ARM must
#                   partition), the ARM on the profile when there is one; the three layouts:
#                   whole device (lanes), disjoint (lanes-static, lanes-arm) and shared pool
#                   (lanes-shared-static, lanes-shared-arm); if it dies within DIED_EARLY_S:
#                   again on plain streams with 3 policies, in the time left                -> mechanism.json,
#                                                                                             partition.png
#   total      505  (TOTAL_BUDGET_S = 525 with the start-ups)
# Every stage's output also goes to log.txt: at most 7 files, all directly under $OUT.
#
# Needs python3 with torch (CUDA), triton, cuda-bindings, numpy, matplotlib, pyyaml and pytest: all in the H200
# image. Where one is missing, carry its wheel (the device tool's README: pip download into .whl/, then
# `pip install --no-index --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site before this script); a missing
# pytest only skips gpu_tests, with a line that says so.
#
# Without CUDA (CI's dry run, tests/test_gpu_evidence.py) the CUDA stages print a SKIP line; the profile still parses
# its arguments, and the mechanism stage runs the same policies and rates with a tiny model on CPU, its first
# attempt asking for green_context (which fails at once there) so the fallback runs too (on the `auto` backend:
# plain streams need a GPU).
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:?set OUT to the folder for the evidence files}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 VLLM_RAPID_AUTOLOAD=0
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-525}
DIED_EARLY_S=120
LOG=$OUT/log.txt
START=$(date +%s)
SUMMARY=()
: >"$LOG"

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME BUDGET_S CMD...: run CMD under min(BUDGET_S, time left), output appended to log.txt; sets STAGE_RC.
stage() {
    local name=$1 budget=$2 left limit began took
    shift 2
    left=$((START + TOTAL_BUDGET_S - $(date +%s)))
    limit=$((budget < left ? budget : left))
    if ((limit < 10)); then
        say "SKIP $name: only ${left}s left of the ${TOTAL_BUDGET_S}s budget"
        SUMMARY+=("$name: skipped (no time left)")
        STAGE_RC=124
        return
    fi
    say "== $name: up to ${limit}s: $*"
    began=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    STAGE_RC=$?
    took=$(($(date +%s) - began))
    if ((STAGE_RC == 124 || STAGE_RC == 137)); then
        say "== $name: TIMED OUT after ${took}s (limit ${limit}s)"
    else
        say "== $name: exit $STAGE_RC after ${took}s"
    fi
    SUMMARY+=("$name: exit $STAGE_RC, ${took}s")
}

skip() {
    say "SKIP $1: $2"
    SUMMARY+=("$1: skipped ($2)")
}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
    CUDA=1
    say "CUDA device visible: the full run"
else
    CUDA=0
    say "no CUDA device (torch.cuda.is_available() is False): dry run, CUDA stages skip"
fi

# --- env ---
env_report() {
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "uname: $(uname -a)"
        "$PY" - <<'EOF'
import importlib.metadata as metadata
import sys

print("python:", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "cuda-bindings", "numpy", "matplotlib", "pyyaml", "pytest"):
    try:
        print(f"{name}: {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: NOT INSTALLED")
try:
    import vllm  # noqa: F401
    print("vllm: importable (the GPU machine was expected to have none)")
except ImportError as exc:
    print(f"vllm: not importable ({exc}), as expected")
import torch

print("torch.version.cuda:", torch.version.cuda, "cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB, "
          f"capability {props.major}.{props.minor}")
EOF
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi
        else
            echo "nvidia-smi: not found"
        fi
    } >"$OUT/env.txt" 2>&1
}
export -f env_report
export PY REPO OUT
stage env 15 bash -c env_report

# --- sm_probe ---
if ((CUDA)); then
    stage sm_probe 60 "$PY" -m vllm_rapid.tools.sm_probe --backend green_context --output "$OUT/sm_probe.json"
else
    skip sm_probe "no CUDA device"
fi

# --- gpu_tests ---
GPU_TEST_FILES=(tests/test_partition.py tests/test_mechanism.py tests/test_arm.py)
if "$PY" -c "import pytest" >>"$LOG" 2>&1; then
    stage gpu_tests 110 bash -c 'set -o pipefail; "$0" -m pytest -m gpu -v -rs -p no:cacheprovider "${@:2}" 2>&1 |
        tee "$1"' "$PY" "$OUT/gpu_tests.txt" "${GPU_TEST_FILES[@]}"
else
    skip gpu_tests "pytest is not installed (carry its wheel, see the header)"
fi

# --- profile ---
PROFILE=$OUT/profile.yaml
PROFILE_ARGS=(profile --backend green_context --batch-sizes 1,16,64,256 --context-lens 512,2048 --prefill-tokens 2048
    --iters 5 --output "$PROFILE")
stage profile 75 "$PY" -m vllm_rapid.tools.profile "${PROFILE_ARGS[@]}"
if ((!CUDA && STAGE_RC == 2)); then
    say "profile: arguments parsed; it needs a GPU (exit 2: no GPU visible)"
fi

# --- mechanism ---
POLICIES=serial,hybrid-512,hybrid-512-i4,lanes,lanes-static,lanes-arm
# The shared pool needs SM partitions: on CUDA only (CPU threads refuse it).
SHARED_POLICIES=lanes-shared-static,lanes-shared-arm
FALLBACK_POLICIES=serial,hybrid-512,lanes
COMMON=(--rates 4,10,16 --itl-slo-ms auto --ttft-slo-ms 1000)
if ((CUDA)); then
    SCALE=(--duration-s 5 --drain-timeout-s 5 --warmup-requests 4)
    FALLBACK_BACKEND=streams
    POLICIES=$POLICIES,$SHARED_POLICIES
else
    SCALE=(--device cpu --hidden-size 64 --num-layers 1 --num-heads 4 --num-kv-heads 2 --head-dim 16
        --intermediate-size 128 --vocab-size 256 --num-requests 6 --length-scale 0.03 --block-size 4
        --max-num-seqs 8 --warmup-requests 1 --drain-timeout-s 5)
    FALLBACK_BACKEND=auto
fi
ARM_PROFILE=()
[[ -s $PROFILE ]] && ARM_PROFILE=(--arm-profile "$PROFILE")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mechanism_started=$(date +%s)
stage mechanism 245 "$PY" -m benchmarks.mechanism "${COMMON[@]}" "${SCALE[@]}" "${ARM_PROFILE[@]}" \
    --partition-backend green_context --policies "$POLICIES" --out "$WORK/first"
RESULTS=$WORK/first
if ((STAGE_RC != 0 && $(date +%s) - mechanism_started < DIED_EARLY_S)); then
    say "mechanism: the first attempt died early (exit $STAGE_RC); again on $FALLBACK_BACKEND with $FALLBACK_POLICIES"
    left=$((245 - ($(date +%s) - mechanism_started)))
    stage mechanism_fallback "$left" "$PY" -m benchmarks.mechanism "${COMMON[@]}" "${SCALE[@]}" \
        --partition-backend "$FALLBACK_BACKEND" --policies "$FALLBACK_POLICIES" --out "$WORK/fallback"
    RESULTS=$WORK/fallback
fi
# results.json is rewritten after every run, so an interrupted sweep still leaves what it finished.
[[ -s $RESULTS/results.json ]] && cp "$RESULTS/results.json" "$OUT/mechanism.json"
[[ -s $RESULTS/partition.png ]] && cp "$RESULTS/partition.png" "$OUT/partition.png"

say "== summary (${TOTAL_BUDGET_S}s budget, $(($(date +%s) - START))s used):"
for line in "${SUMMARY[@]}"; do
    say "   $line"
done
say "files: $(cd "$OUT" && ls | tr '\n' ' ')"
