#!/usr/bin/env bash
# GPU-ready check ([H] #14 item 7). UNTESTED ON GPU: written on a machine without one; its Python half runs on the
# CPU in the tests (bench/gpu_check.py --device cpu).
#
# On an NVIDIA machine with this checkout, Python 3.10+ (venv), a C++ compiler, cmake and access to PyPI (plus
# NVIDIA's and PyTorch's wheel indexes):
#   1. checks nvidia-smi and nvcc, makes a venv, installs the project with the GPU pieces: onnxruntime-gpu instead of
#      onnxruntime, llama-cpp-python built with CUDA, TensorRT + cuda-python of the same CUDA major, CPU torch for
#      the export;
#   2. writes the small random-weight snapshot and exports it (fp32 + fp16 graphs, F32 + F16 GGUF);
#   3. runs bench/gpu_check.py: ORT CUDA EP, ORT TensorRT EP, our TensorRT engines, llama.cpp with every layer on
#      the GPU and whole turns, each against the CPU fp32 result; a silent CPU fallback fails; one table.
# Steps 2-3 have a time budget (GPU_CHECK_BUDGET_S, default 480 s); the install has its own (llama.cpp's CUDA
# build takes minutes). Exits non-zero on any failure.
#
#   bash bench/gpu_check.sh   # env: GPU_CHECK_DIR (default ~/.cache/kimia-edge/gpu-check), GPU_CHECK_BUDGET_S, PYTHON
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${GPU_CHECK_DIR:-$HOME/.cache/kimia-edge/gpu-check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
INSTALL_BUDGET_S=${GPU_CHECK_INSTALL_BUDGET_S:-2700}
VENV=$WORK/venv
PY=$VENV/bin/python
LLAMA_CPP=llama-cpp-python==0.3.36 # the version the project pins (ggml ABI)
NVIDIA_INDEX=https://pypi.nvidia.com
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

step() { echo; echo "==> [${SECONDS}s] $*"; }
die() { echo "gpu_check: error: $*" >&2; exit 2; }
within() { # within SECONDS_LEFT_OF_BUDGET CMD...: runs CMD, killed when the budget is spent
  local left=$(( $1 - SECONDS )); shift
  (( left > 0 )) || die "time budget spent before: $*"
  echo "+ $*"; timeout "$left" "$@"
}
mkdir -p "$WORK"

step "1/6 the GPU and the CUDA compiler"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
  || die "nvidia-smi cannot talk to the driver"
export PATH=$PATH:/usr/local/cuda/bin
if ! command -v nvcc >/dev/null; then
  [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null || die "nvcc not found: install the CUDA toolkit (llama.cpp's CUDA build needs it)"
  echo "+ apt-get install nvidia-cuda-toolkit (nvcc for llama.cpp's CUDA build)"
  apt-get update -qq && apt-get install -y -qq nvidia-cuda-toolkit >/dev/null
fi
nvcc --version | tail -1

step "2/6 venv with the project, onnxruntime-gpu, CPU torch"
INSTALL_END=$(( SECONDS + INSTALL_BUDGET_S ))
[[ -x $PY ]] || ${PYTHON:-python3} -m venv "$VENV"
within $INSTALL_END "$PY" -m pip install -q --upgrade pip
# the export runs on the CPU: the CPU wheel is ~0.2 GB where PyPI's default torch brings ~3 GB of CUDA
within $INSTALL_END "$PY" -m pip install -q torch==2.13.0 --index-url "$TORCH_CPU_INDEX" \
  || within $INSTALL_END "$PY" -m pip install -q torch==2.13.0
# llama.cpp with CUDA first, so the project's requirement is already met (no CPU build);
# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS. native = this GPU's architecture only (a faster build).
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native -DLLAVA_BUILD=OFF"
within $INSTALL_END "$PY" -m pip install -q --no-cache-dir "$LLAMA_CPP"
unset CMAKE_ARGS
within $INSTALL_END "$PY" -m pip install -q -e "$REPO[build]"
# onnxruntime and onnxruntime-gpu share the module name: remove the CPU one, then add the GPU one with its CUDA and
# cuDNN wheels (loaded by onnxruntime.preload_dlls())
within $INSTALL_END "$PY" -m pip uninstall -q -y onnxruntime
within $INSTALL_END "$PY" -m pip install -q "onnxruntime-gpu[cuda,cudnn]"

step "3/6 TensorRT and cuda-python for onnxruntime-gpu's CUDA major"
CUDA_MAJOR=$("$PY" -c "from onnxruntime.capi import build_and_package_info as b; print(getattr(b, 'cuda_version', '').split('.')[0])")
[[ -n $CUDA_MAJOR ]] || { CUDA_MAJOR=12; echo "onnxruntime-gpu does not say its CUDA version: assuming 12"; }
echo "onnxruntime-gpu is built for CUDA $CUDA_MAJOR"
within $INSTALL_END "$PY" -m pip install -q --extra-index-url "$NVIDIA_INDEX" \
  "tensorrt-cu$CUDA_MAJOR>=10,<11" "cuda-python>=$CUDA_MAJOR,<$(( CUDA_MAJOR + 1 ))"
# ORT's TensorRT EP dlopens libnvinfer: put the wheels' library folders on the loader path
LIBS=$("$PY" -c "import glob, site; d = site.getsitepackages()[0]; print(':'.join(glob.glob(d + '/tensorrt_libs') + glob.glob(d + '/nvidia/*/lib')))")
export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"$PY" -c "import llama_cpp, onnxruntime, tensorrt; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers()); print('tensorrt', tensorrt.__version__); print('llama.cpp GPU offload:', llama_cpp.llama_supports_gpu_offload())"

CHECK_END=$(( SECONDS + BUDGET_S ))
step "4/6 the small snapshot (budget for steps 4-6: ${BUDGET_S} s)"
SNAPSHOT=$WORK/snap-small
BUNDLE=$WORK/bundle-small
[[ -f $SNAPSHOT/config.json ]] || within $CHECK_END "$VENV/bin/kimia-edge" snapshot make --size small --out "$SNAPSHOT"

step "5/6 export: fp32 + fp16 graphs, F32 + F16 GGUF"
[[ -f $BUNDLE/manifest.json ]] || within $CHECK_END "$VENV/bin/kimia-edge" export --snapshot "$SNAPSHOT" \
  --out "$BUNDLE" --precision fp32 fp16 --llm-precision f32 --llm-quants F16

step "6/6 every GPU path against the CPU fp32 result"
# the driver stops starting rows at the budget and still prints its table; a row already running gets 2 minutes
within $(( CHECK_END + 120 )) "$PY" "$REPO/bench/gpu_check.py" --bundle "$BUNDLE" --device gpu --work "$WORK/check" \
  --budget-s $(( CHECK_END - SECONDS )) --json "$WORK/gpu_check.json"
echo "gpu_check: passed in ${SECONDS} s (rows in $WORK/gpu_check.json)"
