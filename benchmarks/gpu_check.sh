#!/usr/bin/env bash
# One GPU check of the project, at most ~10 minutes on one GPU; installs nothing (run it in the environment where
# `pip install -e ".[test]"` was done). It
#   1. runs the tests that use CUDA when it is available (tests/test_modeling_common.py's GPU tests and the focused
#      model / segmentation / teacher / loss tests) and benchmarks/device_consistency.py (CUDA against the CPU);
#   2. measures the recipe's step (ViT-B/16 at 560 px, 20 crops at 224 px, DINOv2-B at 490 px, random weights) on
#      CUDA in bf16 at batch 2, 4 and 8 per GPU: images/s and peak torch.cuda.max_memory_allocated, without
#      torch.compile, and (last, batch 4 first) with it while the time budget lasts;
#   3. runs `accelerate launch training/distill.py --config configs/tiny.yaml` on the GPU and loads its model there
#      (before the compiled steps);
#   4. writes everything to one results file (default outputs/gpu_check_results.md).
#
#   bash benchmarks/gpu_check.sh                     # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run           # on a CPU: the same steps with tiny shapes on the CPU
#   bash benchmarks/gpu_check.sh --results out.md    # another results file
set -uo pipefail  # not -e: a failed step is recorded and the next one still runs
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DRY_RUN=0
RESULTS=outputs/gpu_check_results.md
BUDGET_S=570  # seconds: no step runs past this, and optional steps start only if they fit
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --results) RESULTS="$2"; shift ;;
        --budget) BUDGET_S="$2"; shift ;;
        *) echo "error: unknown option $1 (use --dry-run, --results FILE, --budget SECONDS)" >&2; exit 2 ;;
    esac
    shift
done
PYTHON="${PYTHON:-python}"
ACCELERATE="${ACCELERATE:-accelerate}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FAILED=0
mkdir -p "$(dirname "$RESULTS")"

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu; SHAPE=(--tiny); BATCHES=(2); COMPILE_BATCHES=(2); LAUNCH_FLAGS=(--cpu --num_processes 1)
    TINY_STEPS=(--max_steps 4)
else
    DEVICE=cuda; SHAPE=(); BATCHES=(2 4 8); COMPILE_BATCHES=(4 2 8); LAUNCH_FLAGS=(--num_processes 1)
    TINY_STEPS=()
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: torch sees no CUDA device; run on a GPU machine, or pass --dry-run to check the script on a CPU." >&2
        exit 2
    fi
fi

# step LABEL TIMEOUT_S COMMAND...: run it, append its output tail, exit status and duration to the results file.
step() {
    local label="$1" limit="$2"; shift 2
    local start=$SECONDS rc left=$((BUDGET_S - SECONDS))
    # Never past the budget: the whole check stays within ~10 minutes even when a step hangs.
    [ "$left" -lt "$limit" ] && limit=$(( left > 10 ? left : 10 ))
    echo "== $label" >&2
    timeout "$limit" "$@" >"$WORK/out" 2>&1
    rc=$?
    [ $rc -ne 0 ] && FAILED=1
    {
        echo "### $label"
        echo
        echo "\`$*\` -> exit $rc$( [ $rc -eq 124 ] && echo " (timed out after $limit s)" ) in $((SECONDS - start)) s"
        echo
        echo '```'
        tail -n 40 "$WORK/out"
        echo '```'
        echo
    } >>"$RESULTS"
    return $rc
}

# within_budget LABEL NEEDED_S: true if a step that may take NEEDED_S seconds still ends within the budget.
within_budget() {
    if [ $((SECONDS + $2)) -gt "$BUDGET_S" ]; then
        echo "Skipped $1: it could take $2 s, and $((BUDGET_S - SECONDS)) s of the $BUDGET_S s budget are left." \
            >>"$RESULTS"
        return 1
    fi
}

{
    echo "# gpu_check results ($( [ "$DRY_RUN" = 1 ] && echo "DRY RUN on the CPU, tiny shapes" || echo "CUDA" ))"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo '```'
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__);
print('CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    echo '```'
    echo
} >"$RESULTS"

# 1. Tests that use CUDA when it is there, then CUDA against the CPU on the public calls.
if [ "$DRY_RUN" = 1 ]; then
    step "1. tests (dry run: the GPU-gated tests only, they skip on a CPU)" 300 \
        "$PYTHON" -m pytest tests/test_modeling_common.py -q -rs -k "cuda or gpu or device_map or inductor"
else
    step "1. tests with CUDA available" 240 "$PYTHON" -m pytest -q -rs tests/test_modeling_common.py \
        tests/test_modeling.py tests/test_segmentation.py tests/test_teachers.py tests/test_losses.py
fi
step "1b. CUDA against the CPU (dense features, segmentation)" 120 \
    "$PYTHON" benchmarks/device_consistency.py --device "$DEVICE"

# 2. The recipe's step in bf16 (autocast + bf16 teachers, no checkpointing) at each batch, then compiled.
VARIANT="bf16 autocast + bf16 teachers"
for batch in "${BATCHES[@]}"; do
    within_budget "the step at batch $batch" 150 || break
    step "2. step, bf16, batch $batch" 150 "$PYTHON" benchmarks/train_step.py "${SHAPE[@]}" --device "$DEVICE" \
        --batch_size "$batch" --steps 5 --rounds 1 --variants "$VARIANT" --timeout 140
done

# 3. The built-in tiny run through accelerate, then its model on the device.
step "3. accelerate launch training/distill.py --config configs/tiny.yaml" 240 \
    "$ACCELERATE" launch "${LAUNCH_FLAGS[@]}" training/distill.py --config configs/tiny.yaml \
    --output_dir "$WORK/tiny" "${TINY_STEPS[@]}"
step "3b. the tiny run's model on $DEVICE" 60 "$PYTHON" -c "
import torch
from declip_hf import DeCLIPVisionModel
model = DeCLIPVisionModel.from_pretrained('$WORK/tiny/model').to('$DEVICE').eval()
with torch.no_grad():
    dense = model.get_dense_features(torch.randn(1, 3, 64, 64, device='$DEVICE')).dense_embeds
assert torch.isfinite(dense).all(), 'non-finite features'
print('dense features', tuple(dense.shape), 'on', dense.device)
"

# 2c. Compiled steps last (batch 4, the goal's, first), each only if it still fits in the budget.
for batch in "${COMPILE_BATCHES[@]}"; do
    within_budget "the compiled step at batch $batch" 200 || break
    step "2. step, bf16, torch.compile, batch $batch" 200 "$PYTHON" benchmarks/train_step.py "${SHAPE[@]}" \
        --device "$DEVICE" --batch_size "$batch" --steps 5 --rounds 1 --variants "$VARIANT, compiled" --timeout 190
done

echo "Overall: $( [ $FAILED = 0 ] && echo "every step passed" || echo "SOME STEPS FAILED (see above)" ), $SECONDS s" \
    >>"$RESULTS"
echo "Results in $RESULTS" >&2
exit $FAILED
