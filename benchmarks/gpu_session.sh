#!/usr/bin/env bash
# The measurements of a GPU session, run on the CUDA machine after the kit is installed
# (python -m benchmarks.gpu_kit install; see benchmarks/gpu_kit.py):
#
#   bash benchmarks/gpu_session.sh [STEP...]    # default: check minilm tests bert
#
#   check   nvidia-smi, versions, tforge doctor                                      (~10 s)
#   minilm  tforge build models/minilm-gpu.yaml on all-MiniLM-L6-v2 (the kit's float16-stored
#           weights), then benchmarks/gpu.py on its CUDA graphs with PyTorch eager FP32/FP16
#           and torch.compile at b1/b8/b32 s128
#   tests   the tests marked gpu (ORT CUDA and floor/memory on the GPU; TensorRT where present)
#   bert    the same as minilm on a BERT-base-sized model with seeded random weights (timing
#           only), without torch.compile (a minute of compiling the session can spend better)
#
# The default order is the order of need: the figures on the default model, the tests,
# then the larger model.
#
# Each step has a time limit, and the whole call a deadline (SESSION_S seconds, default 540,
# under the device tool's 600 s a call): a step is cut short to end before it, and skipped when
# too little is left, so what ran comes back. Logs, reports and JSON results (written after each
# shape) go to $OUT (the folder the device tool brings back), or ./gpu-out.
set -uo pipefail
DEADLINE=$(($(date +%s) + ${SESSION_S:-540}))

STORE=${TFORGE_KIT_STORE:-/tmp/tforge-kit}
OUT=${OUT:-$PWD/gpu-out}
ARTIFACTS=${TFORGE_ARTIFACTS:-/tmp/tforge-artifacts}
PYTHON=${PYTHON:-python3}
MINILM="$STORE/bundle/minilm16"
mkdir -p "$OUT"
if [[ ! -f "$STORE/env.sh" ]]; then
    echo "no kit installed in $STORE: run python -m benchmarks.gpu_kit install first" >&2
    exit 2
fi
# shellcheck disable=SC1091
source "$STORE/env.sh"
export PYTHONPATH="$PWD:$PYTHONPATH"

# step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, print its tail.
step() {
    local name=$1 limit=$2 start rc left
    shift 2
    start=$(date +%s)
    left=$((DEADLINE - start - 15))
    if ((left < 30)); then
        echo "$name: skipped, $((DEADLINE - start)) s left of this call" | tee -a "$OUT/steps.txt"
        return 124
    fi
    ((limit > left)) && limit=$left
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(($(date +%s) - start)) s" | tee -a "$OUT/steps.txt"
    tail -n 30 "$OUT/$name.log"
    return $rc
}

# build_and_time NAME CHECKPOINT [--compile]: the GPU recipe on CHECKPOINT, its reports into
# $OUT/NAME/, then the GPU benchmark on its CUDA graphs (with torch.compile when asked).
build_and_time() {
    local name=$1 checkpoint=$2 compile=${3:-} run
    run="$name-$(date +%Y%m%d-%H%M%S)"
    step "$name-build" 420 "$PYTHON" -m pipeline build models/minilm-gpu.yaml \
        --model "$checkpoint" --skip-unavailable --artifacts "$ARTIFACTS" --run-id "$run" -q
    mkdir -p "$OUT/$name"
    cp "$ARTIFACTS/runs/$run"/{manifest.json,report.json,report.md,report.html,junit.xml} \
        "$OUT/$name/" 2>/dev/null
    local models="$ARTIFACTS/runs/$run/models"
    if [[ -f "$models/cuda16/model.onnx" ]]; then
        step "$name-gpu" 420 "$PYTHON" -m benchmarks.gpu --checkpoint "$checkpoint" \
            --onnx "fp32=$models/cuda32" --onnx "fp16=$models/cuda16" \
            --shapes b1s128,b8s128,b32s128 --runs 100 --warmup 20 $compile \
            --out "$OUT/gpu-$name.json"
    else
        echo "$name: no cuda16 graph was built; see $name-build.log" | tee -a "$OUT/steps.txt"
    fi
}

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(check minilm tests bert)
for name in "${steps[@]}"; do
    case $name in
    check)
        step check 120 bash -c "nvidia-smi; $PYTHON -c 'import sys, torch, onnxruntime, transformers; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); \
print(\"onnxruntime\", onnxruntime.__version__, onnxruntime.__file__); \
print(\"transformers\", transformers.__version__)'; $PYTHON -m pipeline doctor"
        ;;
    tests)
        # Only the modules that hold GPU tests: the others may import test tools (junitparser,
        # pillow) or optional packages this machine lacks, and one failed import stops pytest.
        mapfile -t modules < <(grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort)
        step tests 420 "$PYTHON" -m pytest -m gpu -rs -q -p no:cacheprovider "${modules[@]}"
        ;;
    minilm)
        build_and_time minilm "$MINILM" --compile
        ;;
    bert)
        step bert-model 180 "$PYTHON" -m benchmarks.models_random /tmp/bert-base "$MINILM"
        build_and_time bert-base /tmp/bert-base
        ;;
    *)
        echo "unknown step $name (check, tests, minilm, bert)" >&2
        exit 2
        ;;
    esac
done
