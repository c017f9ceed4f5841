#!/usr/bin/env bash
# Issue 18 on one H100, in one command (about 13 minutes wall; every part has its own time limit, and
# a part that fails or runs out of time does not stop the others). Where a command may run 10 minutes at
# most, run it in two: PARTS="tests trainers" and PARTS="steps decode" (default: every part). Results under $OUT (default ./out-issue18):
#   tests.txt                    pytest -m gpu of the files issue 18 touches (captured Trainer incl. classification,
#                                liger vs unfused in bf16, captured steps, CUDA kernels)
#   trainers-e2e/                dt.Trainer vs transformers.Trainer + PEFT, the LoRA paper's E2E regime
#                                (batch 8, 40-130 tokens, r=4 on q,v, bf16): table, trainers.json, trainers.png
#   trainers-llama1b/, trainers-smollm2-16x1024/   the same trainers on the two large shapes (r=16, all linears)
#   step-smollm2.json            step benchmark, SmolLM2 shape 16x1024, r=16 all linears, dropout 0.05:
#                                full FT, PEFT, deltatune captured (with and without dropout), liger-fused
#   step-llama1b.json            the same on the Llama-1B shape 8x2048: full FT, PEFT without dropout,
#                                deltatune captured and eager
#   step-smollm2-nativedrop.json deltatune on the SmolLM2 shape with DELTATUNE_TRITON_DROPOUT=0 (part abdrop)
#   dropout-kernels.json, tiles.env   the dropout kernels alone per mask setting and a tile sweep (part dropk),
#   step-llama1b-*.json          the 1B step with each mask setting and the swept tiles (part dropk)
#   prof-e2e.txt                 operator table of the E2E-regime Trainer step, eager (part prof)
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

want() { [ -z "${PARTS:-}" ] || [[ " $PARTS " == *" $1 "* ]]; }

# 1. GPU tests (about 20 s)
if want tests; then
part 100 tests $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" ${TESTS:-tests/train/test_trainer_cuda_graph.py \
    tests/train/test_fused.py tests/train/test_cuda_graph.py tests/kernels/test_kernels_cuda.py \
    tests/kernels/test_kernels_lora.py tests/train/test_collate.py tests/kernels/test_dropout_triton.py}
cp "$LOG" "$OUT/tests.txt"
fi

cd benchmarks
# 2. what users run: both trainers, the E2E regime (about 1 min) and the two large shapes (about 4 min;
#    --warmup covers the steps cuda_graph "auto" times before it decides)
if want trainers; then
part 100 trainers-e2e $PY bench_trainers.py --steps 200 --warmup 20 --out "$OUT/trainers-e2e"
part 170 trainers-llama1b $PY bench_trainers.py --shape llama1b --batch 8 --min-len 2048 --max-len 2048 --r 16 \
    --targets all --dropout 0.05 --steps 24 --warmup 10 --out "$OUT/trainers-llama1b"
part 110 trainers-smollm2 $PY bench_trainers.py --batch 16 --min-len 1024 --max-len 1024 --r 16 --targets all \
    --dropout 0.05 --steps 40 --warmup 12 --out "$OUT/trainers-smollm2-16x1024"
fi

# 3. step benchmark, every mode of a shape in the same call (about 1 + 1.5 min)
if want steps; then
part 100 step-smollm2 $PY bench_lora_vs_peft.py --shape smollm2 --batch 16 --seq 1024 --isolate \
    --modes full,peft,deltatune,deltatune_nodrop --fused liger --json "$OUT/step-smollm2.json"
part 150 step-llama1b $PY bench_lora_vs_peft.py --shape llama1b --batch 8 --seq 2048 --isolate \
    --modes full,peft_nodrop,deltatune,deltatune_eager --fused liger --json "$OUT/step-llama1b.json"
fi

# 3b. the LoRA dropout with and without the Triton kernels (kernels/dropout_triton.py), same shape
if want abdrop; then
DELTATUNE_TRITON_DROPOUT=0 part 60 step-smollm2-nativedrop $PY bench_lora_vs_peft.py --shape smollm2 --batch 16 \
    --seq 1024 --isolate --modes deltatune --fused liger --json "$OUT/step-smollm2-nativedrop.json"
fi

# 3b'. the dropout kernels alone (each mask setting, a tile sweep), then the 1B step with each setting: the
#      defaults (24 bits, 10 rounds, 64x64x4 tiles), the swept tiles, 16 bits with 10 and with 7 rounds
#      (short on device time: DROPK_SWEEP=0 skips the tile sweep, DROPK_RNGS="16,7" picks the settings,
#      DROPK_MODES the default run's modes)
if want dropk; then
if [ "${DROPK_SWEEP:-1}" = 1 ]; then
    part 240 dropout-kernels $PY bench_dropout_kernels.py --sweep --json "$OUT/dropout-kernels.json" --tiles-out "$OUT/tiles.env"
else
    part 90 dropout-kernels $PY bench_dropout_kernels.py --shapes llama1b-h2048,llama1b-h8192 --json "$OUT/dropout-kernels.json"
fi
TILES="$(sed -n 's/^DELTATUNE_DROPOUT_TILES=//p' "$OUT/tiles.env" 2>/dev/null)"
part 150 step-llama1b-default $PY bench_lora_vs_peft.py --shape llama1b --batch 8 --seq 2048 --isolate \
    --modes "${DROPK_MODES:-peft_nodrop,deltatune_eager,deltatune_nodrop_eager}" --fused liger \
    --json "$OUT/step-llama1b-default.json"
for rng in ${DROPK_RNGS:-24,10 16,10 16,7}; do
    part 60 "step-llama1b-rng$rng-tiles" env DELTATUNE_DROPOUT_TILES="$TILES" DELTATUNE_DROPOUT_BITS="${rng%,*}" \
        DELTATUNE_DROPOUT_ROUNDS="${rng#*,}" $PY bench_lora_vs_peft.py --shape llama1b --batch 8 --seq 2048 --isolate \
        --modes deltatune_eager --fused liger --json "$OUT/step-llama1b-rng${rng/,/-}-tiles.json"
done
fi

# 3c. where the E2E-regime Trainer step spends its device time (eager, 3 steps)
if want prof; then
part 90 prof-e2e $PY profile_trainer_step.py --out "$OUT/prof-e2e.txt"
fi

# 4. decoding per method (about 1 min)
if want decode; then
part 150 decode $PY bench_decode_methods.py --shape smollm2 --batch 8 --new-tokens 64 --repeats "${DECODE_REPEATS:-5}" \
    --interleave --out "$OUT/decode"
fi
say "done"
