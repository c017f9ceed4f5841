#!/usr/bin/env bash
# Issue 18 on one H100, in one command (about 9 minutes wall; every part has its own time limit, and
# a part that fails or runs out of time does not stop the others). Results under $OUT (default ./out-issue18):
#   tests.txt                    pytest -m gpu of the files issue 18 touches (captured Trainer incl. classification,
#                                liger vs unfused in bf16, captured steps, CUDA kernels)
#   trainers-e2e/                dt.Trainer vs transformers.Trainer + PEFT, the LoRA paper's E2E regime
#                                (batch 8, 40-130 tokens, r=4 on q,v, bf16): table, trainers.json, trainers.png
#   step-smollm2-*.json          step benchmark, SmolLM2 shape 16x1024, r=16 all linears, dropout 0.05:
#                                full FT, PEFT, deltatune (captured) with --fused none / liger / torch
#   step-llama1b-*.json          the same on the Llama-1B shape 8x2048 (PEFT without dropout as the reference)
#   decode/                      decoding tokens/s per method vs the base model (decode_methods.json/.png)
#   summary.txt                  everything printed
# Needs: torch (CUDA) with triton, transformers, peft, safetensors, PyYAML, tqdm, matplotlib (no internet).
# liger-kernel travels as a wheel: liger_kernel-0.8.5-py3-none-any.whl (pure Python, ~0.5 MB; its only
# dependencies are torch and triton, already there). Put it in wheels/ at the repository root or name it in
# $LIGER_WHEEL; without it the liger runs are skipped (fuse_llama says why) and the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out-issue18}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
LOG="$OUT/summary.txt"
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
part() {  # part SECONDS NAME CMD...: run with a time limit, output to the summary
    local limit="$1" name="$2"; shift 2
    say "$name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | grep -v "FutureWarning\|past_key_values\|^\s*$\|forward_call\|output = func" | tee -a "$LOG" | tail -n 40
    say "$name: exit ${PIPESTATUS[0]}"
}

say "start; $($PY -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name())')"
WHEEL="${LIGER_WHEEL:-$(ls wheels/liger_kernel-0.8.5-*.whl 2>/dev/null | head -n 1)}"
if [ -n "$WHEEL" ] && [ -f "$WHEEL" ]; then
    $PY -m pip install --no-deps --no-index --quiet "$WHEEL" 2>&1 | tee -a "$LOG"
fi
$PY -c 'from deltatune.train.fused import liger_available as a; print("liger:", a() or "available")' 2>&1 | tee -a "$LOG"

# 1. GPU tests (about 1.5 min)
part 100 tests $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    tests/train/test_trainer_cuda_graph.py tests/train/test_fused.py tests/train/test_cuda_graph.py \
    tests/kernels/test_kernels_cuda.py
cp "$LOG" "$OUT/tests.txt"

cd benchmarks
# 2. what users run: the E2E regime through both trainers (about 1.5 min)
part 100 trainers-e2e $PY bench_trainers.py --steps 200 --warmup 20 --out "$OUT/trainers-e2e"

# 3. step benchmark, SmolLM2 shape 16x1024 (each mode in its own process)
part 75 step-smollm2-base $PY bench_lora_vs_peft.py --shape smollm2 --batch 16 --seq 1024 --isolate \
    --modes full,peft,deltatune --json "$OUT/step-smollm2-none.json"
for f in liger torch; do
    part 45 "step-smollm2-$f" $PY bench_lora_vs_peft.py --shape smollm2 --batch 16 --seq 1024 --isolate \
        --modes deltatune --fused "$f" --json "$OUT/step-smollm2-$f.json"
done

# 4. step benchmark, Llama-1B shape 8x2048
part 75 step-llama1b-base $PY bench_lora_vs_peft.py --shape llama1b --batch 8 --seq 2048 --isolate \
    --modes peft_nodrop,deltatune --json "$OUT/step-llama1b-none.json"
part 45 step-llama1b-liger $PY bench_lora_vs_peft.py --shape llama1b --batch 8 --seq 2048 --isolate \
    --modes deltatune --fused liger --json "$OUT/step-llama1b-liger.json"

# 5. decoding per method (about 1 min)
part 50 decode $PY bench_decode_methods.py --shape smollm2 --batch 8 --new-tokens 64 --repeats 3 --out "$OUT/decode"
say "done"
