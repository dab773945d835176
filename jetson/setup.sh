#!/usr/bin/env bash
# Prepare a Jetson (or a desktop GPU machine) to build and benchmark vitdeploy's TensorRT engines.
#
#   bash setup.sh [--dry-run] [--no-install] [--max-clocks]
#
# 1. Detects the L4T release (/etc/nv_tegra_release) and so the JetPack release, the TensorRT
#    version (python3 -c "import tensorrt", else the libnvinfer package), CUDA and Python.
# 2. Installs what benchmark.py and build_engine.py need besides TensorRT, only if missing:
#    NumPy, Polygraphy (the pinned range below; it loads the device's libcudart itself) and ONNX
#    Runtime (benchmark.py's reference). JetPack 4.6 (TensorRT 8.2, Python 3.6) is below what
#    Polygraphy supports (TensorRT 8.5+, Python 3.8+): there it installs nothing and says to build
#    and time with trtexec (the bundle's trtexec.txt).
# 3. Prints the power mode (nvpmodel -q) and how to get stable timings. It never changes clocks
#    or the power mode, except `sudo jetson_clocks` with --max-clocks.
#
# --dry-run prints every command that would change something instead of running it.
# --no-install only reports.
# Environment: PYTHON (default python3: the interpreter that will run benchmark.py; JetPack's
# TensorRT bindings live in the system python3), VITDEPLOY_ROOT (prefix for the files read:
# etc/nv_tegra_release, proc/device-tree/model, usr/local/cuda/version.*; for tests),
# POLYGRAPHY_SPEC (override the Polygraphy requirement).
#
# Exit: 0 ready (or --dry-run / --no-install), 1 something is still missing, 2 bad arguments.
set -euo pipefail

ROOT="${VITDEPLOY_ROOT:-}"
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
INSTALL=1
MAX_CLOCKS=0

usage() {
    # The comment block at the top of this file.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --no-install) INSTALL=0 ;;
        --max-clocks) MAX_CLOCKS=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Run a command that changes the machine, or only print it with --dry-run.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf 'would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        printf '+'
        printf ' %q' "$@"
        printf '\n'
        "$@"
    fi
}

say() { printf '%s\n' "$*"; }

# --------------------------------------------------------------------------------------------
# What is this machine?
# --------------------------------------------------------------------------------------------

L4T_MAJOR=""
L4T=""
RELEASE_FILE="$ROOT/etc/nv_tegra_release"
if [ -r "$RELEASE_FILE" ]; then
    line="$(head -n 1 "$RELEASE_FILE")"
    L4T_MAJOR="$(printf '%s\n' "$line" | sed -n 's/^#[[:space:]]*R\([0-9][0-9]*\)[[:space:]]*(release).*/\1/p')"
    revision="$(printf '%s\n' "$line" | sed -n 's/.*REVISION:[[:space:]]*\([0-9][0-9.]*\).*/\1/p')"
    if [ -n "$L4T_MAJOR" ]; then
        case "$revision" in
            "") revision="0.0" ;;
            *.*) ;;
            *) revision="$revision.0" ;;
        esac
        L4T="$L4T_MAJOR.$(printf '%s' "$revision" | cut -d. -f1-2)"
    fi
fi

# L4T release -> JetPack release (the same table as benchmark.py's jetpack_for_l4t).
jetpack_for() {
    case "$1" in
        32.4.3) echo 4.4 ;; 32.4.4) echo 4.4.1 ;; 32.5.0) echo 4.5 ;; 32.5.1|32.5.2) echo 4.5.1 ;;
        32.6.1) echo 4.6 ;; 32.7.1) echo 4.6.1 ;; 32.7.2) echo 4.6.2 ;; 32.7.3) echo 4.6.3 ;;
        32.7.4) echo 4.6.4 ;; 32.7.5) echo 4.6.5 ;; 32.7.6) echo 4.6.6 ;;
        34.1.0) echo "5.0 DP" ;; 34.1.1) echo "5.0.1 DP" ;; 35.1.0) echo 5.0.2 ;; 35.2.1) echo 5.1 ;;
        35.3.1) echo 5.1.1 ;; 35.4.1) echo 5.1.2 ;; 35.5.0) echo 5.1.3 ;; 35.6.0) echo 5.1.4 ;;
        35.6.1) echo 5.1.5 ;;
        36.2.0) echo "6.0 DP" ;; 36.3.0) echo 6.0 ;; 36.4.0) echo 6.1 ;; 36.4.3) echo 6.2 ;; 36.4.4) echo 6.2.1 ;;
        32.*) echo 4.x ;; 34.*|35.*) echo 5.x ;; 36.*) echo 6.x ;; 38.*) echo 7.x ;;
        *) echo unknown ;;
    esac
}

# The TensorRT each JetPack generation ships (what engines built there need).
trt_for_l4t_major() {
    case "$1" in
        32) echo "8.2 on JetPack 4.6" ;;
        34|35) echo "8.4 on JetPack 5.0.2, 8.5 on JetPack 5.1.x" ;;
        36) echo "8.6 on JetPack 6.0, 10.3 on JetPack 6.1 and 6.2" ;;
        *) echo "unknown" ;;
    esac
}

say "== vitdeploy device setup$( [ "$DRY_RUN" = 1 ] && printf ' (dry run)' )"
if [ -n "$L4T" ]; then
    JETPACK="$(jetpack_for "$L4T")"
    model=""
    if [ -r "$ROOT/proc/device-tree/model" ]; then
        model="$(tr -d '\0' < "$ROOT/proc/device-tree/model")"
    fi
    say "Jetson: ${model:-unknown module}, L4T R$L4T, JetPack $JETPACK"
    say "  (NVIDIA ships TensorRT $(trt_for_l4t_major "$L4T_MAJOR"))"
    if [ "$L4T_MAJOR" = 32 ]; then
        say "note: TX2 (sm_62) has no fast INT8: build fp32 and fp16 engines there; Xavier/Orin run all three."
    fi
else
    JETPACK=""
    say "not a Jetson (no $RELEASE_FILE): desktop GPU machine"
fi

# Python that will run benchmark.py.
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
if [ -z "$PY_VERSION" ]; then
    echo "error: $PYTHON not found: install Python 3 (JetPack ships python3) or set PYTHON=..." >&2
    exit 1
fi
say "Python: $PYTHON $PY_VERSION"

py_has() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
py_value() { "$PYTHON" -c "$1" 2>/dev/null || true; }

# TensorRT: the Python bindings first (what the scripts use), else the library package.
TRT_VERSION="$(py_value 'import tensorrt; print(tensorrt.__version__)')"
TRT_NOTE=""
if [ -z "$TRT_VERSION" ] && command -v dpkg-query >/dev/null 2>&1; then
    for pkg in libnvinfer10 libnvinfer8 libnvinfer7; do
        v="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)"
        if [ -n "$v" ]; then
            TRT_NOTE="library $pkg $v is installed but '$PYTHON -c \"import tensorrt\"' fails: install python3-libnvinfer (sudo apt-get install python3-libnvinfer) or use the system python3"
            break
        fi
    done
fi
if [ -n "$TRT_VERSION" ]; then
    say "TensorRT: $TRT_VERSION"
elif [ -n "$TRT_NOTE" ]; then
    say "TensorRT: Python bindings missing; $TRT_NOTE"
else
    say "TensorRT: not found (no 'import tensorrt', no libnvinfer package)"
fi

# CUDA version: the toolkit's version file, else nvcc.
CUDA_VERSION=""
if [ -r "$ROOT/usr/local/cuda/version.json" ]; then
    CUDA_VERSION="$(grep -m 1 '"version"' "$ROOT/usr/local/cuda/version.json" \
        | sed -n 's/.*"version"[[:space:]]*:[[:space:]]*"\([0-9][0-9.]*\)".*/\1/p' || true)"
elif [ -r "$ROOT/usr/local/cuda/version.txt" ]; then
    CUDA_VERSION="$(sed -n 's/^CUDA Version \([0-9][0-9.]*\).*/\1/p' "$ROOT/usr/local/cuda/version.txt" | head -n 1)"
elif [ -z "$ROOT" ] && command -v nvcc >/dev/null 2>&1; then
    CUDA_VERSION="$(nvcc --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p' | head -n 1)"
fi
CUDA_MAJOR="${CUDA_VERSION%%.*}"
CUDA_MINOR="$(printf '%s' "$CUDA_VERSION" | cut -s -d. -f2)"
say "CUDA: ${CUDA_VERSION:-unknown}"

# --------------------------------------------------------------------------------------------
# What benchmark.py and build_engine.py need: NumPy, Polygraphy, ONNX Runtime
# --------------------------------------------------------------------------------------------

# The range build_engine.py is written against (its POLYGRAPHY_SPEC).
POLYGRAPHY="${POLYGRAPHY_SPEC:-polygraphy>=0.49.9,<0.54}"
TRTEXEC_ONLY=0
case "$PY_VERSION" in
    3.[0-7]) TRTEXEC_ONLY=1 ;;
esac
if [ "$L4T_MAJOR" = 32 ]; then
    TRTEXEC_ONLY=1
fi

PIP_USER=(--user)
if [ -n "${VIRTUAL_ENV:-}" ] || [ "$(py_value 'import sys; print(int(sys.prefix != getattr(sys, "base_prefix", sys.prefix)))')" = 1 ]; then
    PIP_USER=()  # inside a virtual environment
fi

MISSING=()
pip_install() {
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        run sudo apt-get install -y python3-pip
    fi
    run "$PYTHON" -m pip install ${PIP_USER[@]+"${PIP_USER[@]}"} "$@"
}

# module, pip requirement
need() {
    if py_has "$1"; then
        say "$1: $(py_value "import $1; print($1.__version__)") (ok)"
    elif [ "$INSTALL" = 1 ]; then
        pip_install "$2"
    else
        MISSING+=("$1")
    fi
}

if [ "$TRTEXEC_ONLY" = 1 ]; then
    say "build_engine.py and benchmark.py need Polygraphy, which needs TensorRT 8.5+ and Python 3.8+:"
    say "  on this device build and time with trtexec (the bundle's trtexec.txt); nothing to install"
else
    need numpy numpy
    need polygraphy "$POLYGRAPHY"
    need onnxruntime onnxruntime
fi

if [ -z "$TRT_VERSION" ]; then
    MISSING+=(tensorrt)
fi

# --------------------------------------------------------------------------------------------
# Stable timings
# --------------------------------------------------------------------------------------------

say ""
say "== Power mode and clocks (for stable timings)"
if [ -n "$L4T" ]; then
    if command -v nvpmodel >/dev/null 2>&1; then
        say "nvpmodel -q:"
        nvpmodel -q 2>&1 | sed 's/^/  /' || true
    else
        say "nvpmodel not found (it is part of JetPack: nvidia-l4t-nvpmodel)"
    fi
    say "- Benchmark in the mode you will deploy in; for peak numbers the maximum mode"
    say "  (sudo nvpmodel -m 0 is MAXN on TX2, AGX Xavier and AGX Orin; other modules number their modes"
    say "  differently: 'nvpmodel -p --verbose' lists them; a mode change may need a reboot)."
    say "- Lock the clocks at their maximum with 'sudo jetson_clocks' (or this script's --max-clocks):"
    say "  with dynamic frequency scaling the first runs are slow and p99 is noise. It lasts until reboot."
    say "- Keep the device cool (fan on: 'sudo jetson_clocks --fan') and idle otherwise; benchmark.py samples"
    say "  tegrastats to record RAM, temperatures and power while each engine runs."
    if [ "$MAX_CLOCKS" = 1 ]; then
        if command -v jetson_clocks >/dev/null 2>&1 || [ "$DRY_RUN" = 1 ]; then
            run sudo jetson_clocks
        else
            say "warning: --max-clocks: jetson_clocks not found"
        fi
    fi
else
    if command -v nvidia-smi >/dev/null 2>&1; then
        say "GPU: $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo unknown)"
    fi
    say "- Desktop GPUs boost with temperature: warm-up runs matter; to pin clocks see 'nvidia-smi -lgc'"
    say "  (not done here). --max-clocks only applies to Jetsons."
fi

say ""
say "== Next"
if [ "$TRTEXEC_ONLY" = 1 ]; then
    say "  build and benchmark: the commands in the bundle's DEPLOY.md / trtexec.txt (/usr/src/tensorrt/bin/trtexec)"
else
    say "  build:     python3 build_engine.py model.onnx --out model.fp16.engine --precision fp16   (see README.md)"
    say "  benchmark: python3 benchmark.py ."
fi
if [ "${#MISSING[@]}" -gt 0 ]; then
    say "missing: ${MISSING[*]}"
    if [ "$DRY_RUN" = 1 ] || [ "$INSTALL" = 0 ]; then
        exit 0
    fi
    exit 1
fi
if [ "$DRY_RUN" = 0 ] && [ "$INSTALL" = 1 ] && [ "$TRTEXEC_ONLY" = 0 ] && ! py_has polygraphy; then
    say "missing: polygraphy (its install failed above)"
    exit 1
fi
say "ready"
