#!/usr/bin/env bash
# The GPU check as one prepared command (see benchmarks/gpu_check.py): on a machine with no
# network, packages the image lacks come as wheels in .gpu/wheels and the embedded model's
# tokenizer in .gpu/tokenizer (made by benchmarks/gpu_carry.sh). Results and the log go to
# $OUT when set (the device tool), else results/benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/benchmarks}"
mkdir -p "$out"
if [ -d .gpu/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
tokenizer=()
[ -d .gpu/tokenizer ] && tokenizer=(--tokenizer .gpu/tokenizer)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu.txt" || true
set -o pipefail
python3 benchmarks/gpu_check.py --results_dir "$out" "${tokenizer[@]}" "$@" 2>&1 | tee "$out/log.txt"
