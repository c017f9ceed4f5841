#!/usr/bin/env bash
# Jittor's CUDA build against CUDA 13 (issue 17), on one GPU, in one command of about 3 minutes.
#
#   OUT=/path/to/out benchmarks/gpu_jittor_cuda13.sh        (from the checkout root or anywhere)
#
# Steps (each prints one "STEP name: OK|FAIL|TIMEOUT|SKIP ..." line to $OUT/summary.txt and stdout; a step
# that fails does not stop the script; a step whose prerequisite failed is skipped):
#   versions   nvcc, g++, python, torch, the installed jittor (found without importing it)
#   patch      scripts/jittor_cuda13.py: the patched copy of Jittor in ~/.cache/deltatune/jittor-cuda13/
#              (the installed package is never modified) and the environment that imports it
#   import     import the copy with nvcc_path set: Jittor compiles its core and its cuBLAS/cuRAND/cub
#              operators with CUDA (minutes on a fresh machine), then a matmul on the GPU (use_cuda=1)
#              against NumPy
#   ops        softmax, log_softmax and where() on the GPU against NumPy (the patched cub code paths)
#   fwd-bwd    tiny GPT-2 and tiny Llama with LoRA: Jittor on the GPU vs PyTorch on the GPU (float32):
#              max |logits difference| and max |LoRA gradient difference| of one summed loss
#   align      `deltatune align --mode exact` on the tiny Llama for 10 steps, PyTorch and Jittor both on
#              the GPU (use_cuda=2 forces every Jittor operator onto CUDA); verdict lines and the measured
#              differences go to the summary (runs whenever import is OK, whatever fwd-bwd found)
# Files under $OUT: summary.txt (what is printed), jittor_cuda13.log (everything, compiler output included),
# align/ (align_summary.json, verdict.txt, align_scores.md; no checkpoints).
# Jittor's compile cache lives in ~/.cache/jittor (JITTOR_HOME moves it); on a warm machine a second call
# reuses it, so a step that ran out of time goes further the next time.
# Environment: OUT (default ./out-jittor-cuda13), PY (default python3), NVCC (default /usr/local/cuda/bin/nvcc),
# BUDGET_S (seconds for the whole script, default 175), JITTOR_CUDA13_DEST (where the patched copy goes;
# default ~/.cache/deltatune/jittor-cuda13/<version>), STEP_CAPS (1: each step also has its own limit, the
# number after its name below; 0: a step may use all the time left, e.g. with BUDGET_S=540 for one
# 9-minute call on a fresh machine, where Jittor's first build and JIT compiles take most of the time).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out-jittor-cuda13}"
PY="${PY:-python3}"
NVCC="${NVCC:-/usr/local/cuda/bin/nvcc}"
BUDGET_S="${BUDGET_S:-175}"
STEP_CAPS="${STEP_CAPS:-1}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
LOG="$OUT/jittor_cuda13.log"
: > "$SUMMARY"
: > "$LOG"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
declare -A STATUS

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# step NAME MAX_S CMD...: run CMD with the smaller of MAX_S and the time left; all output to the log; the
# lines of CMD's output that start with "RESULT " go to the summary; on failure the first compiler errors too
step() {
    local name="$1" max="$2"; shift 2
    local limit; limit=$(left); (( STEP_CAPS && limit > max )) && limit=$max
    if (( limit < 5 )); then STATUS[$name]=TIMEOUT; say "STEP $name: TIMEOUT (no time left of BUDGET_S=$BUDGET_S)"; return; fi
    local part="$OUT/.part-$name.log" t0; t0=$(date +%s)
    echo "===== $(date -u +%H:%M:%S) step $name (limit ${limit}s): $*" >> "$LOG"
    # (in a subshell: bash's own "Aborted" notice for a crashed command stays out of the output)
    ( timeout --kill-after=5 "$limit" "$@" > "$part" 2>&1 ) 2>/dev/null
    local rc=$? dt=$(( $(date +%s) - t0 ))
    cat "$part" >> "$LOG"
    echo "===== step $name: exit $rc after ${dt}s" >> "$LOG"
    grep -a '^RESULT ' "$part" | sed 's/^RESULT /  /' | tee -a "$SUMMARY"
    if (( rc == 0 )); then STATUS[$name]=OK; say "STEP $name: OK (${dt}s)"
    elif (( rc == 124 || rc == 137 )); then STATUS[$name]=TIMEOUT
        say "STEP $name: TIMEOUT after ${dt}s (a second call on the warm machine continues from Jittor's cache)"
    else STATUS[$name]=FAIL; say "STEP $name: FAIL (exit $rc after ${dt}s); first errors:"
        { grep -a -m 12 -E 'error|Error|Exception|FAIL|Check failed' "$part" || tail -n 12 "$part"; } | cut -c1-400 | sed 's/^/  | /' | tee -a "$SUMMARY"
    fi
    rm -f "$part"
}
needs() {  # needs NAME PREREQ: skip NAME unless PREREQ is OK
    if [[ "${STATUS[$2]:-}" != OK ]]; then STATUS[$1]=SKIP; say "STEP $1: SKIP ($2 is ${STATUS[$2]:-not run})"; return 1; fi
}

say "gpu_jittor_cuda13 $(date -u +%FT%TZ) budget ${BUDGET_S}s, OUT=$OUT"

step versions 30 bash -c '
echo "RESULT nvcc: $('"$NVCC"' --version | tail -n 2 | head -n 1)"
echo "RESULT g++: $(g++ --version | head -n 1)"
'"$PY"' - <<EOF
import importlib.util, platform, sys
print("RESULT python:", platform.python_version(), sys.executable)
try:
    import torch
    print("RESULT torch:", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:  # noqa: BLE001
    print("RESULT torch: not importable:", e)
s = importlib.util.find_spec("jittor")
print("RESULT jittor (installed):", s.submodule_search_locations[0] if s else "NOT INSTALLED")
EOF
'

ENVFILE="$OUT/.jittor_cuda13.env"
DEST_ARG=""
[[ -n "${JITTOR_CUDA13_DEST:-}" ]] && DEST_ARG="--dest '$JITTOR_CUDA13_DEST'"
step patch 60 bash -c "'$PY' scripts/jittor_cuda13.py --nvcc '$NVCC' $DEST_ARG > '$ENVFILE' && sed 's/^/RESULT /' '$ENVFILE'"
# shellcheck disable=SC1090
[[ "${STATUS[patch]}" == OK ]] && source "$ENVFILE"
rm -f "$ENVFILE"

if needs import patch; then
step import 150 "$PY" - <<'EOF'
import time
t0 = time.time()
import numpy as np
from deltatune.jittor import require_jittor
jt = require_jittor()  # the patched copy (PYTHONPATH); nvcc_path and use_mkl come from the environment
from deltatune.jittor.models import to_jt, to_np  # float32/int32 in, Var.data out (numpy 2 safe)
print("RESULT jittor:", jt.__file__, "version", jt.__version__, "has_cuda", jt.compiler.has_cuda,
      f"import {time.time() - t0:.1f}s")
assert jt.compiler.has_cuda, "jittor did not pick up CUDA (has_cuda = 0)"
jt.flags.use_cuda = 1
rng = np.random.default_rng(0)
a, b = rng.normal(size=(64, 48)).astype(np.float32), rng.normal(size=(48, 32)).astype(np.float32)
t1 = time.time()
mm = to_np(jt.matmul(to_jt(a), to_jt(b)))
d = np.abs(mm - a @ b).max()
print(f"RESULT matmul (cuBLAS) on GPU: max |diff| vs numpy {d:.3g} ({time.time() - t1:.1f}s incl. JIT)")
assert d < 1e-3, d
EOF
fi

if needs ops import; then
step ops 90 "$PY" - <<'EOF'
import time
import numpy as np
from deltatune.jittor import require_jittor
jt = require_jittor()
from deltatune.jittor.models import to_jt, to_np
jt.flags.use_cuda = 1
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 256)).astype(np.float32)
e = np.exp(x - x.max(-1, keepdims=True))
SM, LSM, WH = "softmax (cub BlockReduce, patched cub::Max)", "log_softmax", "where (cub DeviceSelect, patched iterators)"
want = {SM: e / e.sum(-1, keepdims=True), LSM: np.log(e / e.sum(-1, keepdims=True)), WH: np.nonzero(x[0] > 0)[0]}
run = {SM: lambda: jt.nn.softmax(to_jt(x), dim=-1), LSM: lambda: jt.nn.log_softmax(to_jt(x), dim=-1),
       WH: lambda: jt.where(to_jt((x[0] > 0).astype(np.float32)))[0]}
bad = 0
for name, fn in run.items():
    t1 = time.time()
    try:
        got = to_np(fn())
        ok = got.shape == want[name].shape and np.allclose(got, want[name], atol=1e-5)
        print(f"RESULT {name} on GPU: {'OK' if ok else 'WRONG'} ({time.time() - t1:.1f}s incl. JIT)")
    except Exception as err:  # report and go on to the next operator
        ok = False
        print(f"RESULT {name} on GPU: FAIL {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    bad += not ok
raise SystemExit(1 if bad else 0)
EOF
fi

if needs fwd-bwd import; then
step fwd-bwd 120 "$PY" - <<'EOF'
import tempfile, time
from pathlib import Path
import numpy as np
import torch
import deltatune as dt
from deltatune.jittor import require_jittor
jt = require_jittor()
jt.flags.use_cuda = 1
from deltatune.jittor.lora import load_delta, trainable
from deltatune.jittor.models import load_pretrained, to_np
from deltatune.jittor.train import logits_loss_sum
from tests import tiny_models as tm

LORA = {"llama": dict(target_modules=["q_proj", "v_proj"]),
        "gpt2": dict(target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]})}
dev = "cuda" if torch.cuda.is_available() else "cpu"
bad = []
for kind in ("gpt2", "llama"):
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp())
    model = getattr(tm, kind)()
    model.save_pretrained(tmp / "base")
    dt.apply(model, dt.LoraConfig(r=2, alpha=4, init="random", **LORA[kind]))
    dt.save_delta(model, tmp / "delta")
    jmodel = load_pretrained(tmp / "base")
    load_delta(jmodel, tmp / "delta")
    model = model.to(dev)
    x = tm.example_input(kind)
    ids, mask = x["input_ids"], x["attention_mask"].clone()
    mask[0, :3] = 0
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, 1:][mask[:, :-1] == 0] = -100  # no loss on logits at padded positions (they differ by design)
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    tgt = labels[:, 1:].to(dev)
    ok = tgt != -100
    loss = -(lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * ok).sum()
    loss.backward()
    jl = jmodel(ids.numpy(), attention_mask=mask.numpy())[0]
    jloss, _ = logits_loss_sum(jl, labels.numpy())
    params = trainable(jmodel)
    grads = jt.grad(jloss, list(params.values()))
    real = mask.numpy().astype(bool)
    dl = np.abs(to_np(jl) - logits.detach().cpu().numpy())[real].max()
    # PyTorch's LoRA parameters are named like the checkpoint keys plus the adapter name ("default")
    tg = {n.replace(".default.", "."): p.grad.detach().cpu().numpy()
          for n, p in model.named_parameters() if p.requires_grad}
    gd = []
    for name, g in zip(params, grads):
        want = tg.get(name)
        if want is not None and want.shape == tuple(g.shape):
            gd.append(np.abs(to_np(g) - want).max() / max(np.abs(want).max(), 1e-12))
    print(f"RESULT {kind}: Jittor {'CUDA' if jt.flags.use_cuda else 'CPU'} vs PyTorch {dev}: max |logits diff| {dl:.3g}, loss {float(jloss.item()):.6f} vs "
          f"{loss.item():.6f}, max rel LoRA grad diff {max(gd) if gd else float('nan'):.3g} over {len(gd)}/{len(params)} "
          f"matrices ({time.time() - t0:.1f}s incl. JIT)")
    if not (dl <= 1e-4 and gd and max(gd) <= 1e-3):
        bad.append(kind)
raise SystemExit(1 if bad else 0)
EOF
fi

if needs align import; then
mkdir -p "$OUT/align"
step align 150 bash -c "
set -e
RUN=\$(mktemp -d)
'$PY' - \"\$RUN\" <<'EOF'
import sys
from pathlib import Path
from tests.recipe_fixtures import make_tiny_model_dir, recipe_dict, write_e2e_data, write_recipe
run = Path(sys.argv[1])
model_dir, data_dir = make_tiny_model_dir(run / 'model'), write_e2e_data(run / 'data')
write_recipe(run / 'align.yaml', recipe_dict(model_dir, data_dir, run / 'out', train={
    'max_steps': 10, 'eval_every': 5, 'log_every': 5, 'warmup_steps': 2, 'lr': 1e-2, 'device': 'cuda'}))
EOF
use_cuda=2 '$PY' -m deltatune align \"\$RUN/align.yaml\" --mode exact --no-progress
cp \"\$RUN/out/align_summary.json\" \"\$RUN/out/verdict.txt\" \"\$RUN/out/align_scores.md\" '$OUT/align/'
sed 's/^/RESULT /' \"\$RUN/out/verdict.txt\"
'$PY' -c \"import json,sys; m=json.load(open('\$RUN/out/align_summary.json'))['measured']; print('RESULT measured:', json.dumps(m)[:600])\"
FAILS=\$(grep -c '^FAIL' \"\$RUN/out/verdict.txt\" || true)
rm -rf \"\$RUN\"
[ \"\$FAILS\" = 0 ]  # the step fails when a verdict does
"
fi

say "done in $(( $(date +%s) - START ))s: $(for k in versions patch import ops fwd-bwd align; do printf '%s=%s ' "$k" "${STATUS[$k]:-not run}"; done)"
exit 0
