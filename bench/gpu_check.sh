#!/usr/bin/env bash
# GPU check kit launcher (issue 12, item 7), for a GPU machine without network.
#
#   OUT=/results/dir bash bench/gpu_check.sh [extra bench/gpu_check.py arguments]
#
# 1. Installs pydantic and its dependencies from the wheels in .whl/ into /tmp/site (RCX_SITE),
#    only when `import pydantic` fails (the device lacks it; mlflow is never needed).
# 2. Puts /tmp/site and the repo root on PYTHONPATH (rcx runs from the checkout), unbuffered output.
# 3. Runs bench/gpu_check.py under an outer `timeout` (GPU_CHECK_TIMEOUT_S, default 540 s; each
#    stage has its own, shorter guard inside) and tees everything to $OUT/gpu_check.log; the
#    summary is $OUT/gpu_check.json. Exit code: gpu_check.py's (0 when every stage is ok).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
SITE="${RCX_SITE:-/tmp/site}"
TOTAL_S="${GPU_CHECK_TIMEOUT_S:-540}"
mkdir -p "$OUT"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{
    if ! "$PY" -c "import pydantic" 2>/dev/null; then
        echo "gpu_check.sh: installing the wheels of .whl/ into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    timeout -k 15 "$TOTAL_S" "$PY" bench/gpu_check.py --out "$OUT/gpu_check.json" "$@"
    rc=$?
    echo "gpu_check.sh: exit code $rc"
    exit "$rc"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
