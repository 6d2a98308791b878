#!/usr/bin/env bash
# A venv with vLLM's CUDA wheel (e.g. 0.34.0) on a machine without a GPU, for the engine-core side and the static
# checks of its GPU worker: `bash scripts/install-vllm-venv.sh 0.34.0 DIR`.
# The wheel goes in with --no-deps: it pins GPU kernel packages (flashinfer, cutlass-dsl, tilelang, ...) that are
# large, unpublished in the pinned version (flashinfer-python==0.7.3) or useless without a GPU. Its other
# requirements are installed as it lists them, with the torch release this machine has on disk (same minor).
set -euo pipefail
version=$1 dir=$2
here=$(cd "$(dirname "$0")/.." && pwd)
skip='^(torch|torchaudio|torchvision|torchcodec|flashinfer-python|PyNvVideoCodec|apache-tvm-ffi|tilelang|nvidia-|nvtx|fastsafetensors|instanttensor|quack-kernels|tokenspeed-mla|humming-kernels|numba)\b'
python3 -m venv "$dir"
py="$dir/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "torch==2.14.*"
"$py" -m pip install -q --no-deps "vllm==$version"
"$py" - "$skip" > "$dir/requirements.txt" <<'PY'
import re, sys
from importlib.metadata import requires
skip = re.compile(sys.argv[1])
for req in requires("vllm") or []:
    if "extra ==" not in req and not skip.match(req):
        print(req)
PY
"$py" -m pip install -q -r "$dir/requirements.txt"
"$py" -m pip install -q --no-deps -e "$here"
"$py" -m pip install -q "pytest>=8" tblib pytest-timeout
"$py" -c "import vllm; print('vllm', vllm.__version__)"
