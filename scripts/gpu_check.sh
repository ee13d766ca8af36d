#!/usr/bin/env bash
# The GPU check (docs/gpu.md): Shoal's CUDA paths proven on one GPU in one go, the results left in files.
#
#   scripts/gpu_check.sh [--out DIR]   on a GPU machine: the machine and `shoal doctor`, tests/gpu, the GPU
#                                      benchmarks, a table; within 8 minutes; exit status 1 when a stage failed
#   scripts/gpu_check.sh --dry-run     every stage on the CPU with tiny sizes (what a machine without CUDA runs)
#   scripts/gpu_check.sh --fetch-wheels  with a network: the pure-Python wheels the check needs (pytest, rich,
#                                      ...) into .gpu-wheels/, to travel with the checkout to a bare machine
#
# Needs only this checkout and the machine's own torch (a CUDA build): Shoal runs from src/ (PYTHONPATH);
# pytest and rich come from the machine, else from .gpu-wheels/ (unpacked into a temporary folder). PYTHON
# picks the interpreter (default: the first of python3, python that has torch). Results: DIR (default
# benchmarks/results; the dry run: a new temporary folder), named <date>-gpu-*: doctor.txt/.json,
# tests.txt/.xml, nan_check.json, world_of_one.json, partial_fc.json/.md, fp16_cast.json, summary.md,
# check.log, and each stage's console output (.txt). Without CUDA the script says so, runs the dry run and
# exits 0 when that passes.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The interpreter: PYTHON, else the first of python3 and python that has torch.
PY="${PYTHON:-}"
if [[ -z $PY ]]; then
  for candidate in python3 python; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "import importlib.util as u; assert u.find_spec('torch')" 2> /dev/null; then
      PY="$(command -v "$candidate")"
      break
    fi
  done
  PY="${PY:-python3}"
fi
WHEELS="$ROOT/.gpu-wheels"
# Pure-Python needs of the check beyond torch (py3-none-any wheels: any Python, any machine).
WHEEL_NAMES=(pytest pluggy iniconfig packaging exceptiongroup tomli pytest-timeout rich markdown-it-py mdurl
             pygments typing_extensions)
#: Seconds for the whole GPU run (8 minutes, less a margin for the start and the table), and per stage.
TOTAL_S=465
declare -A BUDGET_S=([doctor]=40 [tests]=210 [nan_check]=70 [world_of_one]=45 [partial_fc]=70 [fp16_cast]=20)

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

MODE=gpu OUT=""
while (($#)); do
  case "$1" in
    --dry-run) MODE=dry ;;
    --fetch-wheels) MODE=fetch ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [[ $MODE == fetch ]]; then
  mkdir -p "$WHEELS"
  # Pure wheels only (py3-none-any), for any Python Shoal supports (>= 3.10): some projects also publish
  # compiled ones (tomli), which would not load on another Python.
  "$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps --implementation py \
    --abi none --platform any --python-version 3.10 -d "$WHEELS" "${WHEEL_NAMES[@]}" || exit 1
  echo "gpu_check.sh: wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1)); carry this folder with the checkout"
  exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/shoal-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

# Missing pure-Python packages come from the carried wheels: a wheel is a zip laid out for site-packages.
# (find_spec: nothing is imported, torch's start-up is paid once, below.)
missing() {
  "$PY" -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' \
    torch pytest pytest_timeout rich 2> /dev/null || echo "torch pytest pytest_timeout rich"
}
MISSING="$(missing)"
if [[ -n $MISSING && -d $WHEELS ]]; then
  mkdir -p "$WORK/site"
  for whl in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$whl" "$WORK/site" || true; done
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
  MISSING="$(missing)"
fi

CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo none)"
if [[ $CUDA == none ]]; then
  echo "gpu_check.sh: '$PY' cannot import torch. HINT: PYTHON=/path/to/python with a CUDA build of torch" >&2
  exit 1
fi
NO_CUDA=""
if [[ $MODE == gpu && $CUDA != 1 ]]; then
  NO_CUDA="no CUDA device here (torch.cuda.is_available() is False with $PY): nothing can be measured on a GPU,
  so this is a dry run of every stage on the CPU with tiny sizes instead"
  MODE=dry
fi
if [[ $MODE == dry ]]; then
  # Tiny CPU numbers never land in benchmarks/results; this folder stays for a look afterwards.
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/shoal-gpu-dry-run.XXXXXX")}"
  DEV=cpu
else
  OUT="${OUT:-$ROOT/benchmarks/results}"
  DEV=cuda
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
D="$(date +%F)"
LOG="$OUT/$D-gpu-check.log"
STAGES="$WORK/stages.tsv"
: > "$STAGES"
START_EPOCH="$(date +%s)"
DEADLINE=$TOTAL_S  # SECONDS counts from the script's start
FAILED=0

note() { echo "gpu_check.sh: $*" | tee -a "$LOG"; }

# run_stage NAME FILE COMMAND...: COMMAND under its own `timeout` (its stage budget, cut to what is left of
# the whole run), stdout and stderr to the console and to OUT/FILE (and the log); one line in the table.
run_stage() {
  local name=$1 file=$2; shift 2
  local left=$((DEADLINE - SECONDS)) budget=${BUDGET_S[$name]}
  local limit=$((budget < left ? budget : left)) start=$SECONDS rc status
  if ((limit < 5)); then
    printf '%s\tskipped\t0\tout of time\n' "$name" >> "$STAGES"
    note "$name: skipped, out of time"
    FAILED=1
    return
  fi
  note "== $name (at most $limit s): $*"
  # timeout runs the command in a process group of its own and signals all of it: ranks included.
  timeout --kill-after=10 "$limit" "$@" < /dev/null 2>&1 | tee "$OUT/$file" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$file" >> "$STAGES"
  note "$name: $status after $((SECONDS - start)) s"
}

[[ -n $NO_CUDA ]] && note "$NO_CUDA"
note "Shoal GPU check, $MODE run, $(date -Is) on $(hostname), $PY; results in $OUT"
[[ -n $MISSING ]] && note "missing Python packages: $MISSING (HINT: run scripts/gpu_check.sh --fetch-wheels where" \
  "there is a network and carry .gpu-wheels/ with the checkout)"

run_stage doctor "$D-gpu-doctor.txt" "$PY" scripts/_gpu_check.py doctor --json-out "$OUT/$D-gpu-doctor.json"

# tests/gpu. The dry run runs the CUDA tests' code on CPU tensors (GPU_CHECK_DEVICE=cpu, tests/gpu/_gpu.py).
if [[ " $MISSING " == *" pytest "* ]]; then
  printf 'tests\tfailed (no pytest)\t0\t\n' >> "$STAGES"
  note "tests: not run, pytest is missing"
  FAILED=1
else
  TEST_DEVICE=""
  [[ $MODE == dry ]] && TEST_DEVICE=cpu
  run_stage tests "$D-gpu-tests.txt" env GPU_CHECK_DEVICE="$TEST_DEVICE" "$PY" -m pytest tests/gpu -v -rfEs \
    -p no:cacheprovider --durations=5 --junitxml="$OUT/$D-gpu-tests.xml"
fi

# The benchmarks (each writes its JSON into OUT): full sizes on the GPU, tiny ones in the dry run.
if [[ $MODE == gpu ]]; then
  NAN_ARGS=(--rounds 3)
  W1_ARGS=(--models mlp_big many_small cnn --modes nocomm shoal ddp --rounds 3 --steps 10 --warmup 3)
  # Memory at 2 ranks only: dp_full there holds the whole classifier, the baseline of the shrink.
  PFC_ARGS=(--classes 1000000 --steps 4 --warmup 1 --memory-worlds 2 --modes dp_full,pfc,pfc_s0.1)
  CAST_ARGS=(--sizes-mb 1 16 64 256)
else
  NAN_ARGS=(--models many_small --rounds 1 --steps 1 --warmup 1 --micro-reps 2)
  W1_ARGS=(--models many_small --modes nocomm shoal --rounds 1 --steps 2 --warmup 1 --batch-size 16)
  PFC_ARGS=(--classes 2000 --dim 16 --batch 8 --steps 1 --warmup 1 --memory-worlds 2 --modes dp_full,pfc,pfc_s0.1)
  CAST_ARGS=(--sizes-mb 1 --reps 3 --blocks 2)
fi
run_stage nan_check "$D-gpu-nan_check.txt" "$PY" benchmarks/nan_check_bench.py --device "$DEV" \
  --name gpu-nan_check --out "$OUT" "${NAN_ARGS[@]}"
run_stage world_of_one "$D-gpu-world_of_one.txt" "$PY" benchmarks/synthetic.py --device "$DEV" \
  --name gpu-world_of_one --out "$OUT" "${W1_ARGS[@]}"
run_stage partial_fc "$D-gpu-partial_fc.txt" "$PY" benchmarks/partial_fc_bench.py --device "$DEV" \
  --name "$D-gpu-partial_fc" --out "$OUT" "${PFC_ARGS[@]}"
run_stage fp16_cast "$D-gpu-fp16_cast.txt" "$PY" benchmarks/cast_bench.py --device "$DEV" \
  --name gpu-fp16_cast --out "$OUT" "${CAST_ARGS[@]}"

"$PY" scripts/_gpu_check.py summary --out "$OUT" --date "$D" --stages "$STAGES" --since "$START_EPOCH" \
  --mode "$MODE" 2>&1 | tee -a "$LOG"
[[ ${PIPESTATUS[0]} == 0 ]] || FAILED=1
note "total $SECONDS s; results in $OUT"
if [[ $MODE == dry ]]; then
  note "dry run on the CPU: no GPU was used and nothing was written to benchmarks/results"
  [[ $CUDA != 1 ]] && note "this machine has no CUDA device; run scripts/gpu_check.sh on a GPU machine for the real check"
fi
if ((FAILED)); then
  note "FAILED: see the table above and the stage logs in $OUT"
  exit 1
fi
exit 0
