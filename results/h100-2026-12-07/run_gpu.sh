#!/usr/bin/env bash
# issue 19, GPU lease of 2026-12-07: E2E LoRA vs full fine-tuning, paper schedule and the 18% protocol,
# four runs side by side on one GPU (train.cuda_graph=true), BLEU/NIST on the device, the rest scored on CPU.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DELTATUNE_CACHE=/root/dtcache
W=/root/dt; R=/root/dtrepo; mkdir -p $W
rm -rf $R; mkdir -p $R; cp -r src configs $R/     # a snapshot: later calls re-send the working tree
cat $W/part_aa .devcarry/p2/part_ab > $W/smollm2.gguf
echo "$(cat .devcarry/p2/gguf.sha)  $W/smollm2.gguf" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .devcarry/p2/gguf-0.19.0-py3-none-any.whl || exit 1
export PYTHONPATH=$R/src:/tmp/site
mkdir -p $W/data/e2e; for f in .devcarry/p2/data/e2e/*.gz; do gunzip -c $f > $W/data/e2e/$(basename $f .gz); done
M=$(python3 -c "from deltatune.models import convert_gguf; print(convert_gguf('$W/smollm2.gguf', name='smollm2'))") || exit 1
echo "model dir: $M"
python3 -c "import torch,transformers,peft;print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
common="--set model.name_or_path=$M --set data.data_dir=$W/data --set train.cuda_graph=true --set eval.metrics=[BLEU,NIST] --set eval.batch_size=64 --no-progress"
p18="--set data.sample_fraction=0.18 --set data.dev_fraction=0.18 --set eval.sample_fraction=0.18"
mkdir -p /root/runs
launch() { name=$1; cfg=$2; shift 2; (cd $R && setsid nohup python3 -m deltatune run configs/$cfg "$@" $common --output-dir /root/runs/$name > $W/$name.log 2>&1 < /dev/null &) ; echo "launched $name"; }
launch e2e_lora e2e_lora.yaml --set train.max_grad_norm=null
launch e2e_full e2e_full.yaml
launch e2e_lora_18pct e2e_lora.yaml $p18 --set train.max_grad_norm=null
launch e2e_full_18pct e2e_full.yaml $p18
