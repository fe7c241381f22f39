#!/usr/bin/env bash
# The recipe of the bundled default model (models/default/): the `micro` preset
# (5M parameters) trained by lbdl itself on tinyshakespeare with `lbdl train`'s
# defaults (5 epochs, bf16 autocast), shipped in bfloat16 (~10 MB with its
# tokenizer). About 5 minutes on 2 free CPU cores (11 minutes when shared).
# Training is deterministic for a seed, so a rerun on the same kind of machine
# gives the same weights.
#
#   bash pipelines/default_model.sh [WORKDIR]     # then: cp -r WORKDIR/default/. models/default/
#
# The same recipe as a pipeline file, each step cached: pipelines/default_model.toml
#   lbdl pipeline run pipelines/default_model.toml   # then: cp -r runs/default-model/default/. models/default/
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/default-model}
mkdir -p "$work"
corpus=data/tinyshakespeare.txt

lbdl tokenizer train "$corpus" --vocab-size 4096 --out "$work/tok" --force
lbdl data prepare "$corpus" --tokenizer "$work/tok" --out "$work/shards" --force
lbdl train --preset micro --data "$work/shards" --out "$work/run" --force
lbdl convert "$work/run/best" --dtype bfloat16 --out "$work/default" --force
cp "$work/shards/val.txt" data/tinyshakespeare-val.txt   # the held-out paragraphs, for `lbdl eval perplexity`
lbdl eval perplexity "$work/default" data/tinyshakespeare-val.txt --ctx 256
