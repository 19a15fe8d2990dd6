#!/usr/bin/env bash
# A learning-rate sweep of the demo config on this machine, then its table and best cell.
#
#     bash examples/sweep_demo.sh                          # 3 rates x 2 seeds x 20 epochs (minutes)
#     NCTOOLS_EXAMPLES_TINY=1 bash examples/sweep_demo.sh  # 2 rates x 1 seed x 2 epochs (CI)
#
# On a Slurm cluster, the same command with `--executor slurm --partition NAME
# --gpus-per-node 1` submits one job array (see docs/sweeps.md).
set -euo pipefail

if [ "${NCTOOLS_EXAMPLES_TINY:-0}" = 1 ]; then
    grid=0.01,0.02 seeds=1 epochs=2 snapshots=all
else
    grid=0.005,0.01,0.02 seeds=2 epochs=20 snapshots=log:8
fi
out=sweeps/demo-example
rm -rf "$out"

nctools sweep demo --grid "train.lr=$grid" --seeds "$seeds" --set "train.epochs=$epochs" \
    --set "snapshot.epochs=$snapshots" --out "$out" --executor local --parallel 2
nctools collect "$out" --out "$out.csv" --best test_acc
nctools plot "$out" --hue train.lr --out "$out.png"
