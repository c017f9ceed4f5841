#!/usr/bin/env bash
# Issue 19 on one GPU, in calls of at most ~9.5 minutes: the E2E paper schedule (LoRA and full fine-tuning),
# the 18% E2E protocol, WebNLG, DART and the GLUE full-data LoRA-vs-full sweeps.
#
#   scripts/gpu_issue19.sh PHASE [PHASE ...]          (run from the checkout root; phases run in order)
#
# Environment:
#   OUT           required: everything brought back goes here (a log, one tarball per bundle/checkpoint:
#                 at most 8 files come back, so phases pack into few files)
#   DATA_DIR      required: the folder holding e2e/, webnlg2017/, dart/, glue/ (../shared/data's layout)
#   SMOLLM2_DIR   the converted SmolLM2-135M Hugging Face directory (safetensors; E2E/WebNLG/DART phases)
#   MINILM_DIR    the all-MiniLM-L6-v2 Hugging Face directory (glue phases)
#   PY            python (default python3); deltatune runs from src/ (PYTHONPATH), not installed
#   RUNS          run directories (default runs/issue19: git-ignored, so a warm machine keeps them between
#                 calls and a later call resumes from their checkpoints)
#   TRAIN_BUDGET_S  seconds one train phase may run before it stops at its last checkpoint (default 480)
#   GEN_BATCH     prompts per decoding batch (default 50; beam 10 -> 500 rows)
#   CUDA_GRAPH    train.cuda_graph (default true; false for a CPU dry run, or if capturing a run's step fails)
#   EXTRA_SETS    more recipe overrides for every run command, space-separated KEY=VALUE (e.g. for a dry run:
#                 "train.device=cpu train.mixed_precision=no")
#
# Phases (RUN is a config of configs/: e2e_lora, e2e_full, e2e_lora_18pct, e2e_full_18pct, webnlg_lora,
# dart_lora):
#   check              versions, CUDA, imports, the model and data folders (fails early, before any work)
#   train:RUN          train RUN with train.cuda_graph=true for at most TRAIN_BUDGET_S seconds, resuming from
#                      the run's latest checkpoint when there is one (a LoRA run checkpoints every 1000 steps,
#                      a full run every 2000); prints "PARTIAL" and goes on when the budget ran out (call
#                      train:RUN again later), "DONE" once the final delta/model is written
#   generate:RUN       decode the run's whole eval split and score BLEU and NIST (and TER for WebNLG/DART;
#                      WebNLG also per seen/unseen split) here; METEOR, ROUGE-L and CIDEr need Java: score
#                      those on a CPU machine with `deltatune evaluate --output-dir DIR --metrics ...`
#   bundle:RUN         $OUT/RUN.tar.gz: config, logs, summaries, predictions, references, sources, categories,
#                      metrics, report and plots (and the final LoRA delta, a few MB); never checkpoints
#   ckpt:RUN           $OUT/RUN-ckpt.tar.gz: the latest LoRA checkpoint and the logs, to resume in another
#                      sitting (refused for full fine-tuning: its checkpoint is ~1.6 GB; finish those runs
#                      within one sitting, where the warm machine keeps the checkpoints between calls)
#   restore:RUN=TAR    unpack a RUN-ckpt.tar.gz (brought back earlier and carried into the tree) into the
#                      run directory, so that train:RUN resumes from it on a fresh machine
#   bench-decode       benchmarks/bench_e2e_decode_time.py on the GPU (64 test inputs, batch 16, beam 10)
#   glue:TASK[:SEEDS]  deltatune sweep configs/glue/lora_vs_full/TASK.yaml (full fine-tuning and LoRA) with
#                      SEEDS (comma-separated, default 1); tables and per-run JSON go into $OUT/glue-TASK.tar.gz
#
# Example plan (the E2E LoRA paper schedule is 26,290 steps, ~11 minutes at 0.025 s/step):
#   call 1: scripts/gpu_issue19.sh check train:e2e_lora ckpt:e2e_lora
#   call 2: scripts/gpu_issue19.sh train:e2e_lora generate:e2e_lora bundle:e2e_lora
#           (on a fresh machine first: restore:e2e_lora=PATH/e2e_lora-ckpt.tar.gz)
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
RUNS=${RUNS:-runs/issue19}
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-480}
GEN_BATCH=${GEN_BATCH:-50}
: "${OUT:?set OUT (the folder whose files come back)}"
: "${DATA_DIR:?set DATA_DIR (the folder holding e2e/, webnlg2017/, dart/, glue/)}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export DELTATUNE_DATA_DIR="$DATA_DIR"
mkdir -p "$OUT" "$RUNS"
LOG="$OUT/gpu_issue19.log"
RUN_CONFIGS="e2e_lora e2e_full e2e_lora_18pct e2e_full_18pct webnlg_lora dart_lora"

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
die() { log "ERROR: $*"; exit 2; }
dt() { "$PY" -m deltatune "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }

check_run() {
  case " $RUN_CONFIGS " in *" $1 "*) ;; *) die "unknown run '$1'; known runs: $RUN_CONFIGS" ;; esac
  [ -f "configs/$1.yaml" ] || die "configs/$1.yaml does not exist"
}

# the overrides every device command of RUN gets: the model and data folders, metrics without Java
overrides() {
  local run=$1
  [ -n "${SMOLLM2_DIR:-}" ] || die "set SMOLLM2_DIR (the converted SmolLM2-135M directory) for $run"
  [ -f "$SMOLLM2_DIR/config.json" ] || die "SMOLLM2_DIR=$SMOLLM2_DIR holds no config.json"
  local metrics="[BLEU, NIST]"
  case $run in webnlg_*|dart_*) metrics="[BLEU, NIST, TER]" ;; esac
  ARGS=(--output-dir "$RUNS/$run" --set "model.name_or_path=$SMOLLM2_DIR" --set "data.data_dir=$DATA_DIR"
        --set "eval.metrics=$metrics" --set "eval.batch_size=$GEN_BATCH")
  case $run in dart_*) ARGS+=(--set data.allow_dev_training=true) ;; esac
  EXTRA=()
  local kv
  for kv in ${EXTRA_SETS:-}; do EXTRA+=(--set "$kv"); done  # last: they win over the phases' own --set
}

is_full() { grep -q "^  method: full" "configs/$1.yaml"; }

phase_check() {
  log "check: $(uname -n), $(date -u)"
  "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
for m in ("transformers", "safetensors", "yaml", "tqdm", "matplotlib", "sacrebleu", "deltatune"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:  # report every missing package, not only the first
        print(m, "MISSING:", exc)
EOF
  [ -d "$DATA_DIR/e2e" ] || die "DATA_DIR=$DATA_DIR has no e2e/"
  log "data: $(ls "$DATA_DIR" | tr '\n' ' ')"
  [ -z "${SMOLLM2_DIR:-}" ] || [ -f "$SMOLLM2_DIR/config.json" ] || die "SMOLLM2_DIR=$SMOLLM2_DIR holds no config.json"
  command -v java >/dev/null && log "java: present" || log "java: absent (METEOR/ROUGE-L/CIDEr are scored on the CPU machine)"
}

phase_train() {
  local run=$1 dir="$RUNS/$1"
  check_run "$run"; overrides "$run"
  if [ -d "$dir/delta" ] || [ -f "$dir/model/config.json" ]; then log "train:$run: DONE already ($dir)"; return 0; fi
  local every=1000
  is_full "$run" && every=2000
  log "train:$run: budget ${TRAIN_BUDGET_S}s; resuming from $(ls -d "$dir"/checkpoint-* 2>/dev/null | sort -V | tail -1 || echo nothing)"
  # killed at the budget: a checkpoint being written then is never marked complete, and resume skips it
  timeout --signal=TERM --kill-after=20 "$TRAIN_BUDGET_S" "$PY" -m deltatune finetune "configs/$run.yaml" "${ARGS[@]}" \
    --set "train.cuda_graph=${CUDA_GRAPH:-true}" --set train.resume_from=latest --set "train.save_every=$every" \
    --set train.keep_last_checkpoints=2 --set train.progress_bar=false "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local last
  last=$(ls -d "$dir"/checkpoint-* 2>/dev/null | sort -V | tail -1)
  if [ "$rc" = 0 ]; then
    log "train:$run: DONE"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    log "train:$run: PARTIAL (budget reached); latest checkpoint: ${last:-none}; call train:$run again"
  else
    die "train:$run failed with exit status $rc"
  fi
}

phase_generate() {
  local run=$1 dir="$RUNS/$1"
  check_run "$run"; overrides "$run"
  [ -d "$dir/delta" ] || [ -f "$dir/model/config.json" ] || die "generate:$run: training is not finished ($dir has no delta/ or model/)"
  dt generate "configs/$run.yaml" "${ARGS[@]}" "${EXTRA[@]}" --no-progress || die "generate:$run failed"
  dt evaluate "configs/$run.yaml" "${ARGS[@]}" "${EXTRA[@]}" || die "evaluate:$run failed"
}

phase_bundle() {
  local run=$1 dir="$RUNS/$1"
  check_run "$run"
  [ -d "$dir" ] || die "bundle:$run: no run directory $dir"
  local files=()
  for f in config.yaml run_info.json train_log.jsonl train_summary.json predictions.txt references.txt sources.txt \
           categories.txt generation_info.json metrics.json report.md plot_loss.png plot_val_ppl.png plot_lr.png delta; do
    [ -e "$dir/$f" ] && files+=("$f")
  done
  tar -czf "$OUT/$run.tar.gz" -C "$dir" "${files[@]}" || die "bundle:$run: tar failed"
  log "bundle:$run: $OUT/$run.tar.gz ($(du -h "$OUT/$run.tar.gz" | cut -f1)): ${files[*]}"
}

phase_ckpt() {
  local run=$1 dir="$RUNS/$1"
  check_run "$run"
  is_full "$run" && die "ckpt:$run: a full fine-tuning checkpoint (~1.6 GB) cannot come back; finish it within one sitting"
  local last
  last=$(ls -d "$dir"/checkpoint-* 2>/dev/null | sort -V | tail -1)
  [ -n "$last" ] || die "ckpt:$run: no checkpoint in $dir"
  local extra=()
  for f in config.yaml run_info.json train_log.jsonl; do [ -e "$dir/$f" ] && extra+=("$f"); done
  tar -czf "$OUT/$run-ckpt.tar.gz" -C "$dir" "$(basename "$last")" "${extra[@]}" || die "ckpt:$run: tar failed"
  log "ckpt:$run: $OUT/$run-ckpt.tar.gz ($(du -h "$OUT/$run-ckpt.tar.gz" | cut -f1)) holds $(basename "$last")"
}

phase_restore() {
  local run=${1%%=*} tarball=${1#*=}
  check_run "$run"
  [ "$tarball" != "$1" ] && [ -f "$tarball" ] || die "restore: expected restore:RUN=TARBALL with an existing file, got '$1'"
  mkdir -p "$RUNS/$run"
  tar -xzf "$tarball" -C "$RUNS/$run" || die "restore:$run: cannot unpack $tarball"
  log "restore:$run: $(ls -d "$RUNS/$run"/checkpoint-* | sort -V | tail -1)"
}

phase_bench_decode() {
  [ -n "${SMOLLM2_DIR:-}" ] || die "bench-decode needs SMOLLM2_DIR"
  "$PY" benchmarks/bench_e2e_decode_time.py --model "$SMOLLM2_DIR" --data-dir "$DATA_DIR" --inputs 64 --batch 16 \
    --device cuda 2>&1 | tee -a "$LOG"
}

phase_glue() {
  local task=${1%%:*} seeds=1
  [ "$task" != "$1" ] && seeds=${1#*:}
  [ -f "configs/glue/lora_vs_full/$task.yaml" ] || die "glue: unknown task '$task' (sst2 mrpc cola stsb rte)"
  [ -n "${MINILM_DIR:-}" ] && [ -f "$MINILM_DIR/config.json" ] || die "glue:$task needs MINILM_DIR (all-MiniLM-L6-v2 directory)"
  local out="$RUNS/glue/$task"
  dt sweep "configs/glue/lora_vs_full/$task.yaml" --seeds "$seeds" --output-dir "$out" --device cuda \
    --set "model=$MINILM_DIR" --set "data_dir=$DATA_DIR" --no-progress || log "glue:$task: some run failed (see results.md)"
  tar -czf "$OUT/glue-$task.tar.gz" -C "$out" . && log "glue:$task: $OUT/glue-$task.tar.gz"
}

[ $# -gt 0 ] || { sed -n '2,49p' "$0"; exit 2; }
for p in "$@"; do
  case $p in
    check) phase_check ;;
    train:*) phase_train "${p#train:}" ;;
    generate:*) phase_generate "${p#generate:}" ;;
    bundle:*) phase_bundle "${p#bundle:}" ;;
    ckpt:*) phase_ckpt "${p#ckpt:}" ;;
    restore:*) phase_restore "${p#restore:}" ;;
    bench-decode) phase_bench_decode ;;
    glue:*) phase_glue "${p#glue:}" ;;
    *) die "unknown phase '$p' (check, train:RUN, generate:RUN, bundle:RUN, ckpt:RUN, restore:RUN=TAR, bench-decode, glue:TASK[:SEEDS])" ;;
  esac
done
log "all phases done: $*"
