#!/usr/bin/env bash
# Set up, plan gpt2-small for 8 A100s, then train gpt-tiny with the emitted module on 4 CPU ranks
# and check its loss against a single-process run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
echo "== autopar plan gpt2-small --cluster a100-80g --devices 8 (predicted by the cost model)"
.venv/bin/autopar plan gpt2-small --cluster a100-80g --devices 8
echo "== torchrun: emitted module on 4 CPU ranks (gloo) vs single process (measured)"
.venv/bin/python -m torch.distributed.run --nproc-per-node 4 examples/train_gpt.py --steps 5 --check --fix dp=2,tp=2
