#!/usr/bin/env bash
# Creates .venv and installs kd's dependencies. Run by `make`; safe to run again.
#
# torch: if the system python already has torch (e.g. a CUDA build on a GPU machine) the
# venv reuses it through --system-site-packages. Otherwise, on a machine with an NVIDIA
# GPU we install the default (CUDA) wheel; on a CPU-only machine the CPU wheel
# (torch==X+cpu, from a local wheel or the PyTorch CPU index), never the multi-GB CUDA build.
set -euo pipefail
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: reusing the system torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
PIP="$VENV/bin/pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: installing torch==$TORCH_VERSION (CUDA build)"
    $PIP install "torch==$TORCH_VERSION"
  else
    # A local wheel or mirror may already hold the +cpu build (pip's own config decides);
    # otherwise take it from the PyTorch CPU index. Both avoid the multi-GB CUDA wheel.
    echo "setup: installing torch==$TORCH_VERSION+cpu (no GPU found)"
    $PIP install "torch==$TORCH_VERSION+cpu" 2>/dev/null ||
      $PIP install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PIP install -r requirements.txt -r requirements-dev.txt
# Tests only: llama-cpp-python's OpenAI-compatible server is the real API teacher of
# tests/test_api_generate.py. pip compiles llama.cpp from the sdist (~6 min on 2 cores, once
# while pip's wheel cache lasts). GGML_NATIVE=OFF: a -march=native build has died with an
# illegal instruction on a machine whose CPU flags list AMX; AVX2/FMA/F16C run on any x86-64
# CPU of the last decade. Other CPUs (ARM) build with llama.cpp's own defaults.
LLAMA_CPP=llama-cpp-python[server]==0.3.36
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "setup: building $LLAMA_CPP (the test suite's API server; a few minutes, once)"
  CMAKE_ARGS=""
  if [ "$(uname -m)" = x86_64 ]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  fi
  # A machine that cannot build it (no compiler, no cmake) still runs everything else; the
  # API server tests then skip, saying that llama-cpp-python is not installed.
  CMAKE_ARGS="$CMAKE_ARGS" $PIP install "$LLAMA_CPP" ||
    echo "setup: WARNING: building $LLAMA_CPP failed; tests/test_api_generate.py will skip"
fi
"$VENV/bin/python" -c "import torch; print('setup: torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
