#!/usr/bin/env bash
# One-call GPU check (issue 14, item 7), made for a single device call of at most 8 minutes on the lent H200
# machine (torch 2.11, triton 3.6, pytest, transformers; no network; no gguf, fastapi or uvicorn).
#
#   make gpu-wheels                            # here, first: .whl/ (gguf, which the test modules import)
#   benchmarks/gpu_check.sh                    # on the GPU machine, from the repository root, .whl carried;
#                                              #   results in $OUT
#   GPU_CHECK_DRY=1 benchmarks/gpu_check.sh    # anywhere: print the commands, run nothing
#
# In order: (0) make hotcold importable without its dependencies (pip install --no-deps -e ., else a
# PYTHONPATH shim), with wheels from .whl/ when that folder was carried; (1) pytest -m gpu on the test files
# that hold gpu-marked tests (the server tests need fastapi and cannot import there); (2) a quick
# ffn_gpu.py sweep at the 7B shape in bf16, (2b) and with Q4_0 hot rows; (3) hybrid_gpu.py (7B-shaped 8-layer synthetic ReGLU model: hybrid vs
# layer split vs all-GPU under one budget, bf16 and then Q4_0 FFN rows; its JSON is rewritten after each).
# Each step has its own timeout inside one overall budget, so one hang cannot eat the call; a failed step
# does not stop the next. Exit status: 0 only if every step passed.
#
# Environment: OUT (results folder; default /tmp/gpu_check_out), GPU_CHECK_BUDGET_S (overall seconds, default
# 450), GPU_CHECK_STEPS (default "pytest,ffn,ffnq,hybrid"), PYTHON (default python3), GPU_CHECK_DRY=1 (print only),
# GPU_CHECK_INSTALL=shim (skip pip: hotcold from links on PYTHONPATH).
# Files in $OUT (<= 8, the device tool's limit): env.txt pytest.log ffn_gpu.log ffn_gpu.json ffn_gpu_q4_0.json
# hybrid_gpu.log hybrid_gpu.json summary.txt.

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
STEPS=${GPU_CHECK_STEPS:-pytest,ffn,ffnq,hybrid}
START=$(date +%s)
FAILED=0
export PYTHONUNBUFFERED=1 HOTCOLD_CACHE=${HOTCOLD_CACHE:-/tmp/hotcold_cache}
unset TRITON_INTERPRET  # the native CUDA kernels, not the interpreter

mkdir -p "$OUT"
: >"$OUT/summary.txt"

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME MAX_SECONDS LOG COMMAND...: run with a timeout of min(MAX_SECONDS, budget left - 5), log to LOG
step() {
    local name=$1 max=$2 log=$3
    shift 3
    local t
    t=$(left)
    t=$((t - 5 < max ? t - 5 : max))
    if [ "$DRY" = 1 ]; then
        echo "[dry] $name (timeout ${max}s at most): $* > $log"
        return 0
    fi
    if [ "$t" -lt 10 ]; then
        note "$name: SKIPPED (budget spent)"
        FAILED=1
        return 1
    fi
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$t" "$@" >"$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        note "$name: ok in $(($(date +%s) - t0)) s"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note "$name: TIMEOUT after ${t} s (tail of $log below)"
        FAILED=1
    else
        note "$name: FAILED rc=$rc in $(($(date +%s) - t0)) s (tail of $log below)"
        FAILED=1
    fi
    [ $rc -ne 0 ] && tail -n 25 "$log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
    return $rc
}

want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# ---- 0. environment and install (no network: nothing is fetched)
if [ "$DRY" = 1 ]; then
    echo "[dry] OUT=$OUT budget=${BUDGET}s steps=$STEPS python=$PY"
    [ -d .whl ] && echo "[dry] $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site"
    echo "[dry] $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . (else PYTHONPATH shim /tmp/hotcold_path)"
else
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
        "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1
        nproc
        git -C "$ROOT" log --oneline -1 2>&1
    } >"$OUT/env.txt"
    cat "$OUT/env.txt"
    if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (device README): into a private site dir
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            >>"$OUT/env.txt" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [ "${GPU_CHECK_INSTALL:-pip}" != pip ] \
        || ! timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$OUT/env.txt" 2>&1 \
        || ! "$PY" -c "import hotcold.kernels" 2>>"$OUT/env.txt"; then
        # the package maps hotcold.engine -> engine/ etc. (pyproject): mirror that with links on PYTHONPATH
        rm -rf /tmp/hotcold_path && mkdir -p /tmp/hotcold_path/hotcold
        ln -s "$ROOT"/hotcold/*.py /tmp/hotcold_path/hotcold/
        for d in engine kernels profiler server; do ln -s "$ROOT/$d" "/tmp/hotcold_path/hotcold/$d"; done
        # PYTHONSAFEPATH: the working directory (the repository root, whose hotcold/ holds only cli.py) must
        # not come first on sys.path and hide the linked package
        export PYTHONPATH=/tmp/hotcold_path${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1
        note "install: PYTHONPATH shim /tmp/hotcold_path (pip -e skipped or failed: see env.txt)"
    fi
    if ! "$PY" -c "import hotcold.kernels, hotcold.engine.hybrid" >>"$OUT/env.txt" 2>&1; then
        note "install: FAILED, hotcold cannot be imported (see env.txt)"
        exit 2
    fi
    if ! "$PY" -c "import gguf" 2>/dev/null; then  # three test modules with gpu tests import it
        note "install: gguf is missing, so some gpu tests cannot be collected: run 'make gpu-wheels' here and carry .whl"
        FAILED=1
    fi
fi

# ---- 1. every gpu-marked test whose module can import here
if want pytest; then
    files=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
    plugin=()
    [ "$DRY" = 1 ] || { "$PY" -c "import pytest_timeout" 2>/dev/null && plugin=(--timeout 120); }
    # xdist: the Triton kernels' specializations compile in 4 processes at once
    [ "$DRY" = 1 ] || { "$PY" -c "import xdist" 2>/dev/null && plugin+=(-n 4); }
    # shellcheck disable=SC2086
    step "pytest -m gpu" 150 "$OUT/pytest.log" "$PY" -m pytest -m gpu -q -rsfE -p no:cacheprovider \
        --continue-on-collection-errors "${plugin[@]}" $files
    if [ "$DRY" != 1 ]; then
        tail -n 1 "$OUT/pytest.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
        # a gpu test skipped on the GPU machine is a failure of the check (it did not run)
        if grep -q "^SKIPPED" "$OUT/pytest.log"; then
            note "pytest -m gpu: some gpu tests were SKIPPED on the GPU machine:"
            grep "^SKIPPED" "$OUT/pytest.log" | head -n 10 | sed 's/^/    /' | tee -a "$OUT/summary.txt"
            FAILED=1
        fi
    fi
fi

# ---- 2. a quick FFN sweep: 7B shape, bf16, batch 1/4/16, dense and 10%/5% density (cuBLAS dense beside)
if want ffn; then
    step "ffn_gpu.py" 75 "$OUT/ffn_gpu.log" "$PY" benchmarks/ffn_gpu.py --device cuda --shapes 7b --dtype bfloat16 \
        --batches 1,4,16 --densities 1,0.1,0.05 --out "$OUT/ffn_gpu.json"
fi

# ---- 2b. the same with quantized hot rows (Q4_0, dequantized in the kernels), 10% density, batch 1 and 16
if want ffnq; then
    step "ffn_gpu.py --qtype q4_0" 50 /tmp/ffn_gpu_q4_0.log "$PY" benchmarks/ffn_gpu.py --device cuda --shapes 7b \
        --dtype bfloat16 --qtype q4_0 --batches 1,16 --densities 1,0.1 --out "$OUT/ffn_gpu_q4_0.json"
    [ "$DRY" = 1 ] || cat /tmp/ffn_gpu_q4_0.log >>"$OUT/ffn_gpu.log"  # one log: $OUT holds 8 files at most
fi

# ---- 3. hybrid vs layer split vs all-GPU under one budget (the rest of the budget): the 7B shape with 8
# layers (32 would take the budget to write, profile and copy: 13.5 GB of synthetic weights)
if want hybrid; then
    step "hybrid_gpu.py" "$BUDGET" "$OUT/hybrid_gpu.log" "$PY" benchmarks/hybrid_gpu.py --device cuda --layers 8 \
        --new-tokens 32 --profile-tokens 1200 --qtypes none,q4_0 --out "$OUT/hybrid_gpu.json"
    [ "$DRY" = 1 ] || grep -E "setup|tok/s|hybrid|split|GPU" "$OUT/hybrid_gpu.log" | tail -n 10 | sed 's/^/    /' \
        | tee -a "$OUT/summary.txt"
fi

[ "$DRY" = 1 ] && exit 0
note "total $(($(date +%s) - START)) s; $([ $FAILED = 0 ] && echo 'ALL OK' || echo 'SOME STEPS FAILED')"
exit $FAILED
