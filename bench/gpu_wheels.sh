#!/usr/bin/env bash
# Wheels for the GPU run of bench_vs_trl on a machine that cannot reach PyPI (this workplace's lent
# GPU machines: their image has torch, transformers, accelerate, pandas, pyarrow, xxhash, but not
# TRL or datasets). Run here, where pip works; carry .whl/ to the GPU machine (bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl trl==1.16.0 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20"
ls -la .whl
