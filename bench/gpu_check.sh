#!/usr/bin/env bash
# The GPU check: one command, run from the repository root on a machine with an NVIDIA GPU.
#
#     bash bench/gpu_check.sh                  # with .venv/ if bootstrap.py made one, else python3
#     PYTHON=/path/to/python bash bench/gpu_check.sh
#
# 1. the CUDA tier of the tests (pytest -m gpu: resume after SIGKILL bit for bit, bf16/fp16,
#    compiled/eager checkpoints, preflight, pinned DataLoader batches, nccl DDP on 2 GPUs),
# 2. bench/throughput.py --device cuda at batch sizes 32, 256 and 4096,
# 3. bench/seeds.py --device cuda (5 seeds one by one against together; goal: 4x at 256),
# then one summary. It needs torch with CUDA, pyyaml, tqdm, numpy and pytest (the tier uses
# neither optuna nor wandb), writes only to temporary folders, and takes a few minutes
# (budget: 8). Exit status 0 when all three pass.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then python=$PYTHON
elif [ -x .venv/bin/python ]; then python=.venv/bin/python
else python=python3
fi
log=$(mktemp -d)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=disabled
started=$SECONDS

echo "== 1. the CUDA tier of the tests"
"$python" -m pytest -m gpu -p no:cacheprovider -q -rs tests/test_gpu.py tests/test_trainer_options.py \
    2>&1 | tee "$log/tests.txt"
tests=${PIPESTATUS[0]}

echo "== 2. throughput on CUDA"
"$python" bench/throughput.py --device cuda --repeats 3 --batch-sizes 32 256 4096 2>&1 | tee "$log/throughput.txt"
bench=${PIPESTATUS[0]}

echo "== 3. seeds together on CUDA"
"$python" bench/seeds.py --device cuda --repeats 3 --batch-sizes 32 256 4096 2>&1 | tee "$log/seeds.txt"
seeds=${PIPESTATUS[0]}

echo
echo "== GPU check summary ($((SECONDS - started)) s)"
"$python" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}")
PY
echo "gpu tests: $(grep -E '(passed|failed|skipped|error)' "$log/tests.txt" | tail -n 1) (exit $tests)"
grep -E '^(a/b|c/b)|samples/s' "$log/throughput.txt"
echo "throughput: exit $bench"
grep -E '^speed-up' "$log/seeds.txt"
echo "seeds: exit $seeds"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$seeds" -eq 0 ]
