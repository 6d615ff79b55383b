#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for benchmarks/gpu_check.sh on a GPU machine without network:
# the embedded model's tokenizer, and wheels for Python 3.12 of what that machine's image lacks
# (deepspeed, built here as a pure-Python wheel; pydantic; chitchat-dataset for replay; and the
# transformers version this project is tested with). About 29 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
mkdir -p .gpu/tokenizer .gpu/wheels
tokenizer=$($python -c "from oml.models import resolve_model; print(resolve_model(None))")
cp "$tokenizer"/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/tokenizer/
binary=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .gpu/wheels
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$python -m pip download -q "${binary[@]}" transformers==5.24.0 chitchat-dataset==0.9.0 hjson==3.1.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
DS_BUILD_OPS=0 $python -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels deepspeed==0.19.8
du -sh .gpu
