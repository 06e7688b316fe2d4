#!/usr/bin/env bash
# The environment partition_quality.py compares in: autopart plus the balancers people
# use today, installed from PyPI (not vendored). CPU build of torch via the constraints file.
#   bash benchmarks/baselines-env.sh && benchmarks/.venv/bin/python benchmarks/partition_quality.py
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv benchmarks/.venv
. benchmarks/.venv/bin/activate
pip install -q -c constraints-cpu.txt -e .
pip install -q --no-deps torchgpipe==0.0.7
DS_BUILD_OPS=0 pip install -q -c constraints-cpu.txt deepspeed==0.19.8
python -c "import torchgpipe.balance.blockpartition, deepspeed.runtime.utils; print('baselines ready')"
