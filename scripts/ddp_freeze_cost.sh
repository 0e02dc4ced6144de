#!/usr/bin/env bash
# What DDP's find_unused_parameters (on under a freeze schedule) costs: two gloo processes on the CPU, ResNet18,
# 30 steps an epoch; epoch 2 of --freeze linear-probe (every layer trains from epoch 2) against --freeze none,
# in alternating rounds. Prints img/s of epoch 2 per run.
#
#   scripts/ddp_freeze_cost.sh artifacts/data/dogs51 [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?prepared dataset folder}
rounds=${2:-2}
python=python
[ -x .venv/bin/python ] && python=.venv/bin/python
out=$(mktemp -d)
for round in $(seq "$rounds"); do
  for freeze in none linear-probe; do
    "$python" -m torch.distributed.run --standalone --nproc_per_node=2 -m dogkit train --exp 3 --device cpu \
      --data "$data" --runs-dir "$out" --name "$freeze-$round" --arch resnet18 --image-size 64 --epochs 2 \
      --batch-size 32 --amp off --freeze "$freeze" --set probe_epochs=1 --set warmup_epochs=0 --set workers=0 \
      --set max_steps_per_epoch=30 > "$out/$freeze-$round.log" 2>&1
    "$python" -c "import csv, sys; r = list(csv.DictReader(open(sys.argv[1])))[1]; print(sys.argv[2], r['img_per_s'])" \
      "$out/$freeze-$round/metrics.csv" "$freeze round $round"
  done
done
rm -rf "$out"
