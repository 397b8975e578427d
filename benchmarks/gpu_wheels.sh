#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu.py needs on a lent GPU machine, which reaches no index:
#   .whl/*.whl        Kiln's dependencies that machine's image lacks (or has at other versions than pyproject.toml's)
#   .whl/titan/*.whl  torchtitan 0.3.0 and 0.2.2 and what they import; benchmarks/gpu_llama.py installs the one
#                     that machine's torch runs
# Run it here, where pip reaches PyPI (about 25 MiB):  bash benchmarks/gpu_wheels.sh
# Then name .whl in the device call's carry and begin its command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
# The GPU image's Python is 3.12 on x86-64.
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
download() { "$python" -m pip download -q --no-deps "${platform[@]}" -d "$@"; }
mkdir -p .whl/titan

# Kiln, at pyproject.toml's pins; DeepSpeed's own needs (pydantic, hjson) too.
download .whl transformers==5.23.0 hydra-core==1.3.8 omegaconf==2.3.1 hjson==3.1.0 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
# PyPI has only source for these two: built here into pure-Python wheels (DeepSpeed's setup imports torch).
"$python" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 antlr4-python3-runtime==4.9.3

# torchtitan: the latest release, the one before it (for torch 2.11, which lacks what 0.3.0 imports), and what they
# import that the image lacks: datasets (and its dill and multiprocess), torchdata, tyro, 0.3.0's torch_checkpointing
# and spmd_types, 0.2.2's tomli. One version of everything else.
download .whl/titan torchtitan==0.3.0
download .whl/titan torchtitan==0.2.2
download .whl/titan datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 torchdata==0.11.0 tyro==1.0.17 \
  docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.16.0 torch-checkpointing==0.1.1 spmd-types==0.2.3 \
  tomli==2.5.0
du -sh .whl
