#!/usr/bin/env bash
# The GPU check of docs/GPU.md on a machine with one CUDA GPU: bench/gpu_throughput.py (arguments go to it),
# then the CUDA tests. About 6 minutes on an H200 (estimated, not yet seen). Prints the bench's JSON lines and
# the pytest summary, and writes both to $OUT (the device machine's return folder) or a temp folder, named on
# the last line.
# Python: .venv/bin/python where there is one; else python3 (the device image's, which holds PyTorch) with the
# wheels in .whl/ that its image lacks (docs/GPU.md says which and how to fetch them).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=python3
if [ -x .venv/bin/python ]; then
  python=.venv/bin/python
else
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH="/tmp/site:$PWD"
  else
    export PYTHONPATH="$PWD"
  fi
fi
out=${OUT:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The figures first: a run cut short by its time limit still returns them.
"$python" bench/gpu_throughput.py "$@" | tee "$out/gpu_throughput.jsonl"
bench=${PIPESTATUS[0]}
"$python" -m pytest -q -p no:cacheprovider tests/training_core/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, bench exit $bench; logs in $out"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
