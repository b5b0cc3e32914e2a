#!/usr/bin/env bash
# The prepared GPU run of fastmid (issue 24): every GPU claim measured by one script in
# about 7 minutes of wall clock on one H200, installs included. README: "Prepared GPU run".
#
#   bash bench/gpu/run_all.sh [--out DIR] [--budget SECONDS] [--only c1,c2] [--skip c1,c2]
#   bash bench/gpu/run_all.sh --smoke [--out DIR]     # CPU, tiny sizes, Triton interpreter (CI)
#
# Cases, each in its own process under `timeout` (a hang, a crash or a CUDA error in one never
# stops the others), each merging its results into one JSON file as it goes:
#   env                machine, driver, versions; measured bf16 matmul rate and copy bandwidth
#   kernel_tests       tests/bench/test_gpu_subset.py on CUDA (kernels + CKA vs float64, tiny
#                      `fastmid train` in bf16-master)
#   kernel_bench       bench/kernels/run_gpu.py: ops vs eager and torch.compile, fused loss memory
#   step_8b            bench/gpu/step_8b.py: Mid-Block step, 8B shape, seq 4096: tokens/s, MFU
#   fit_32b            bench/gpu/fit_32b.py --recommended: 32B band vs the memory plan
#   optimizer_offload  bench/gpu/optimizer_checks.py: offload / in-backward vs the plain step
#   fsdp2              bench/gpu/fsdp2_8b.py: FSDP2, world size 1, NCCL, 8B shape, 3 steps
#   analyze            bench/gpu/analyze_gpu.py: analysis overhead, CKA vs float64 on CPU
#
# Output (at most 3 files, in --out, else $OUT when set, else bench/results; --smoke: a temp
# folder): gpu_<UTC stamp>.json (schema: bench/gpu/gpu_results.py), gpu_<stamp>.md (rendered
# after every case) and gpu_<stamp>.log (every case's output). Wheels in .whl/ (from
# bench/gpu/fetch_wheels.sh) are installed first with pip --no-index --no-deps --target, then
# fastmid with pip install --no-deps -e . (falling back to the repository on PYTHONPATH).
# Exit status: 0 when every case ended ok (or skipped itself for a stated reason), else 1.

set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO" || exit 2

SMOKE=0
OUTDIR=""
BUDGET=""
ONLY=""
SKIP=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) OUTDIR="$2"; shift ;;
        --out=*) OUTDIR="${1#--out=}" ;;
        --budget) BUDGET="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        --skip) SKIP="$2"; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
STAMP="$(date -u +%Y%m%d-%H%M%S)"
if [ -z "$OUTDIR" ]; then
    if [ "$SMOKE" = 1 ]; then OUTDIR="${TMPDIR:-/tmp}/fastmid_gpu_smoke_$STAMP"
    elif [ -n "${OUT:-}" ]; then OUTDIR="$OUT"
    else OUTDIR="$REPO/bench/results"; fi
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
JSON="$OUTDIR/gpu_$STAMP.json"
MD="$OUTDIR/gpu_$STAMP.md"
LOG="$OUTDIR/gpu_$STAMP.log"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/fastmid_gpu_run.XXXXXX")"
RESULTS="$PY $HERE/gpu_results.py"

# Time boxes in seconds. GPU run: 415 for the cases, 11-17 for the installs: about 7 minutes
# (sized on an H200, 2026-12-04: the environment probe took 14-19 s, the test subset 38 s plus
# pytest's exit, the kernel benchmarks about 35 s for every op, the analysis 29 s, 47 s with
# --profile; about 5 s more since it also times CKA on the float64 torch path);
# a case that reaches the end of the run's budget gets what is left (and none when under 5 s).
# Smoke run: about a minute on 2 idle cores (1.6 min at load 9); never over 2 minutes.
if [ "$SMOKE" = 1 ]; then
    BUDGET="${BUDGET:-120}"
    declare -A BOX=([env]=30 [kernel_tests]=60 [kernel_bench]=30 [step_8b]=45 [fit_32b]=30
                    [optimizer_offload]=30 [fsdp2]=30 [analyze]=30)
else
    BUDGET="${BUDGET:-415}"
    declare -A BOX=([env]=30 [kernel_tests]=60 [kernel_bench]=60 [step_8b]=50 [fit_32b]=65
                    [optimizer_offload]=35 [fsdp2]=30 [analyze]=85)
fi
ORDER="env kernel_tests kernel_bench step_8b fit_32b optimizer_offload fsdp2 analyze"

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_DATASETS_CACHE="$SCRATCH/hf_datasets" FASTMID_CACHE="$SCRATCH/fastmid_cache"
export MPLBACKEND=Agg
if [ "$SMOKE" = 1 ]; then
    # CPU: Triton's interpreter for the kernels; one thread (two OpenMP threads on a shared
    # 2-core machine wait on each other: 10-100x slower small ops)
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
else
    export TRITON_INTERPRET=0
fi

now_s() { date +%s.%N; }
SECONDS=0
elapsed() { echo "$SECONDS"; }
log() { echo "[run_all $(elapsed)s] $*" | tee -a "$LOG"; }

$RESULTS init --json "$JSON" --smoke "$SMOKE" --budget "$BUDGET" \
    --command "bash bench/gpu/run_all.sh $([ "$SMOKE" = 1 ] && echo --smoke) (out $OUTDIR)" \
    --cases "${ORDER// /,}" || { echo "run_all.sh: cannot write $JSON" >&2; exit 2; }
log "results: $JSON, $MD, $LOG; budget ${BUDGET}s; smoke=$SMOKE; python $PY"

# ---- installs (GPU machine only; nothing is installed by --smoke) ----------------------------------
WHEELS="none"
INSTALL="already importable"
if [ "$SMOKE" = 0 ]; then
    if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        SITE="$SCRATCH/site"
        if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$REPO"/.whl/*.whl >>"$LOG" 2>&1; then
            export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
            WHEELS="$(cd "$REPO/.whl" && ls *.whl | tr '\n' ' ')"
        else
            WHEELS="pip install of .whl/*.whl failed (see the log)"
        fi
    fi
    importable() { (cd /tmp && "$PY" -c "import fastmid.kernels") >>"$LOG" 2>&1; }
    if ! importable; then
        if timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" \
            >>"$LOG" 2>&1 && importable; then
            INSTALL="pip install --no-deps --no-build-isolation -e ."
        else
            # kernels/ is installed as fastmid.kernels; without the install, a link does it
            [ -e "$REPO/fastmid/kernels" ] || ln -s ../kernels "$REPO/fastmid/kernels"
            export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
            INSTALL="PYTHONPATH=<repo> with a fastmid/kernels link (editable install failed)"
            importable || INSTALL="$INSTALL; fastmid still does not import (see the log)"
        fi
    fi
fi
export FASTMID_INSTALL_METHOD="$INSTALL" FASTMID_WHEELS="$WHEELS"
log "wheels: $WHEELS; fastmid: $INSTALL"

# ---- the cases ---------------------------------------------------------------------------------------
FAILED=0
selected() {
    local c="$1"
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$c,"* ]]; then return 1; fi
    if [ -n "$SKIP" ] && [[ ",$SKIP," == *",$c,"* ]]; then return 1; fi
    return 0
}

run_case() {  # run_case NAME COMMAND...
    local name="$1"; shift
    if ! selected "$name"; then
        $RESULTS skip --json "$JSON" --case "$name" --reason "not selected (--only/--skip)"
        return
    fi
    local left=$((BUDGET - $(elapsed)))
    local box="${BOX[$name]}"
    [ "$left" -lt "$box" ] && box="$left"
    if [ "$box" -lt 5 ]; then
        $RESULTS skip --json "$JSON" --case "$name" --reason "run budget of ${BUDGET}s spent"
        log "case $name: skipped (run budget spent)"
        FAILED=1
        return
    fi
    local offset
    offset="$(stat -c %s "$LOG" 2>/dev/null || echo 0)"
    $RESULTS start --json "$JSON" --case "$name" --timeout "$box"
    log "case $name: start (time box ${box}s): $*"
    local t1 rc
    t1="$(now_s)"
    timeout -k 5 "$box" "$@" >>"$LOG" 2>&1
    rc=$?
    local wall
    wall="$(awk -v a="$t1" -v b="$(now_s)" 'BEGIN {printf "%.1f", b - a}')"
    $RESULTS end --json "$JSON" --case "$name" --rc "$rc" --wall "$wall" --log "$LOG" \
        --log-offset "$offset" --md "$MD"
    [ "$rc" = 0 ] || FAILED=1
    log "case $name: exit $rc after ${wall%.*}s"
}

if [ "$SMOKE" = 1 ]; then S="--smoke"; else S=""; fi
run_case env "$PY" "$HERE/env_probe.py" --json "$JSON" $S
if [ "$SMOKE" = 1 ]; then
    run_case kernel_tests "$PY" "$HERE/case_tests.py" --json "$JSON" --smoke
    run_case kernel_bench "$PY" "$REPO/bench/kernels/run_gpu.py" --smoke --skip-e2e \
        --out "$SCRATCH/kernels" --results-json "$JSON"
    run_case step_8b "$PY" "$HERE/step_8b.py" --smoke --results-json "$JSON" --budget-s 30
    run_case fit_32b "$PY" "$HERE/fit_32b.py" --smoke --precision bf16-master --optim adamw \
        --out "$SCRATCH/fit" --results-json "$JSON"
    run_case optimizer_offload "$PY" "$HERE/optimizer_checks.py" --device cpu \
        --optims adamw,adamw8bit --out "$SCRATCH/optim" --results-json "$JSON"
    run_case fsdp2 "$PY" "$HERE/fsdp2_8b.py" --smoke --steps 2 --results-json "$JSON"
    run_case analyze "$PY" "$HERE/analyze_gpu.py" --smoke --profile --results-json "$JSON"
else
    run_case kernel_tests "$PY" "$HERE/case_tests.py" --json "$JSON" --workers 4
    run_case kernel_bench "$PY" "$REPO/bench/kernels/run_gpu.py" --skip-e2e --tokens 16384 \
        --lce-tokens 8192 --lce-vocab 152064 --budget-s $((BOX[kernel_bench] - 15)) \
        --out "$SCRATCH/kernels" --results-json "$JSON"
    run_case step_8b "$PY" "$HERE/step_8b.py" --results-json "$JSON" \
        --budget-s $((BOX[step_8b] - 12))
    run_case fit_32b "$PY" "$HERE/fit_32b.py" --recommended --steps 2 --out "$SCRATCH/fit" \
        --results-json "$JSON"
    run_case optimizer_offload "$PY" "$HERE/optimizer_checks.py" --device cuda \
        --optims adamw,adamw8bit --out "$SCRATCH/optim" --results-json "$JSON"
    run_case fsdp2 "$PY" "$HERE/fsdp2_8b.py" --results-json "$JSON"
    run_case analyze "$PY" "$HERE/analyze_gpu.py" --profile --results-json "$JSON"
fi

$RESULTS render --json "$JSON" --md "$MD" --final
log "done in $(elapsed)s: $MD"
"$PY" - "$JSON" <<'EOF' | tee -a "$LOG"
import json, sys
d = json.load(open(sys.argv[1]))
for name, c in d["cases"].items():
    print(f"  {name:18s} {c.get('status'):8s} {c.get('wall_s') or '':>6} s  {c.get('reason') or ''}")
for g in d["goals"]:
    none = "no verdict (smoke)" if d["smoke"] and g["value"] is not None else "not measured"
    verdict = {True: "met", False: "NOT met", None: none}[g["met"]]
    print(f"  goal: {g['name']}: {verdict} ({g['value']} {g['unit']}) {g['note'][:100]}")
EOF
rm -rf "$SCRATCH"
exit "$FAILED"
