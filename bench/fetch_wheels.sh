#!/usr/bin/env bash
# The wheels bench/device_run.sh installs on the lent GPU machine (Python 3.12, x86_64, no
# registry there; torch, accelerate, pyarrow, peft, safetensors, tokenizers are in its image).
# Run here, from the repository root; writes .whl/ (git-ignored; about 25 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=".venv/bin/python -m pip"
rm -rf .whl && mkdir -p .whl
# The versions of this project's venv, so the GPU run uses the code the CPU runs used.
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl \
  trl==1.16.0 transformers==5.23.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 \
  regex==2026.11.15
# DeepSpeed ships as a source archive only; its wheel is pure Python (ops build at run time).
$PIP wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
du -sh .whl && ls .whl
