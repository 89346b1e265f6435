#!/usr/bin/env bash
# Checks that the workspace compiles with `--features cuda`, on a machine with no GPU, no
# NVIDIA driver and no system CUDA toolkit.
#
# What it does:
#   1. Installs a CUDA toolkit from NVIDIA's PyPI wheels (pinned below) into a virtualenv
#      outside the repository ($CUDA_VENV). Only the CUDA 13 wheels ship the `nvcc` driver
#      (the `*-cu12` nvcc wheels hold ptxas alone), so this is CUDA 13.4, the newest release
#      that cudarc 0.19 (candle 0.11's CUDA bindings) knows.
#   2. Assembles a CUDA root from the wheels' nvidia/cu13 folder (bin, include, nvvm, and a lib/
#      of symlinks that adds the unversioned `libfoo.so` names the linker wants).
#   3. Runs, with that toolkit on PATH and CUDA_HOME pointing at it:
#        cargo check  --workspace --all-targets --features ddim/cuda,ddim-cli/cuda
#        cargo clippy --workspace --all-targets --features ddim/cuda,ddim-cli/cuda -- -D warnings
#      This builds and runs the real build scripts: cudarc reads the version from
#      `nvcc --version`, and candle-kernels compiles its .cu files to PTX and to a static
#      library with nvcc (for CUDA_COMPUTE_CAP, default 80, since there is no GPU to ask).
#      Expect about 10 minutes on 2 cores the first time, most of it nvcc.
#   4. Only when CUDA_LIBCUDA_DIR names a folder holding libcuda.so (a driver's, or a full
#      toolkit's lib64/stubs): `cargo build --release -p ddim-cli --features cuda`, which links.
#      No PyPI wheel ships libcuda.so (the driver library or its link stub), so without that
#      variable the link step is skipped and said so.
# It runs nothing on a GPU and needs none. Exit status: 0 passed, 75 the toolkit could not be
# installed (no PyPI), anything else a failed check. Needs: python3 (with venv), a C/C++ compiler that
# nvcc accepts as host compiler (gcc <= 15), cargo with clippy, and access to PyPI/crates.io.
#
# Environment (all optional):
#   CUDA_VENV          virtualenv for the wheels   (default: $HOME/.cache/ddim-cuda-venv)
#   CUDA_TARGET_DIR    cargo target dir            (default: <repo>/target/cuda)
#   CUDA_COMPUTE_CAP   GPU arch nvcc compiles for  (default: 80)
#   CUDA_LIBCUDA_DIR   folder with libcuda.so; enables step 4
#   PYTHON             interpreter for the venv    (default: python3)
#   JOBS               cargo -j and nvcc threads   (default: 2)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_VENV="${CUDA_VENV:-$HOME/.cache/ddim-cuda-venv}"
CUDA_TARGET_DIR="${CUDA_TARGET_DIR:-$REPO_ROOT/target/cuda}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
FEATURES="ddim/cuda,ddim-cli/cuda"

# CUDA 13.4.3 (the versions the `cuda-toolkit[nvcc,cudart,nvrtc,cublas,curand,cccl]==13.4.3`
# meta-package pins), each pinned here.
WHEELS=(
  nvidia-cuda-nvcc==13.4.92
  nvidia-cuda-crt==13.4.92
  nvidia-nvvm==13.4.92
  nvidia-cuda-runtime==13.4.92
  nvidia-cuda-nvrtc==13.4.92
  nvidia-cuda-cccl==13.3.4.3.1
  nvidia-cublas==13.8.0.4
  nvidia-curand==10.4.4.72
)

log() { printf '\n==> %s\n' "$*" >&2; }

# --- 1. the toolkit wheels -------------------------------------------------------------------
stamp="$CUDA_VENV/.ddim-cuda-wheels"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${WHEELS[*]}" ]]; then
  log "installing CUDA wheels into $CUDA_VENV"
  [[ -x "$CUDA_VENV/bin/python" ]] || "$PYTHON" -m venv "$CUDA_VENV" ||
    { echo "could not make a virtualenv with $PYTHON" >&2; exit 75; }
  # Exit status 75 (EX_TEMPFAIL) when the wheels cannot be had (no network to PyPI): nothing
  # about our code is known then, and .ci/run says so instead of failing.
  "$CUDA_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${WHEELS[@]}" ||
    { echo "could not install the CUDA wheels from PyPI" >&2; exit 75; }
  printf '%s' "${WHEELS[*]}" >"$stamp"
fi
cu13="$("$CUDA_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
[[ -x "$cu13/bin/nvcc" ]] || { echo "no nvcc under $cu13" >&2; exit 1; }

# --- 2. a CUDA root ----------------------------------------------------------------------------
cuda_root="$CUDA_TARGET_DIR/cuda-root"
rm -rf "$cuda_root"
mkdir -p "$cuda_root/lib"
for d in bin include nvvm; do ln -s "$cu13/$d" "$cuda_root/$d"; done
for f in "$cu13"/lib/*; do
  name="$(basename "$f")"
  ln -s "$f" "$cuda_root/lib/$name"
  # libcublas.so.13 -> also libcublas.so; libnvrtc-builtins.so.13.4 is only loaded by name.
  if [[ "$name" =~ ^(lib[A-Za-z]+)\.so\.[0-9]+$ ]]; then
    ln -s "$f" "$cuda_root/lib/${BASH_REMATCH[1]}.so"
  fi
done
if [[ -n "${CUDA_LIBCUDA_DIR:-}" ]]; then
  [[ -e "$CUDA_LIBCUDA_DIR/libcuda.so" ]] || { echo "no libcuda.so in $CUDA_LIBCUDA_DIR" >&2; exit 1; }
  ln -s "$CUDA_LIBCUDA_DIR/libcuda.so" "$cuda_root/lib/libcuda.so"
fi

export PATH="$cuda_root/bin:$PATH"
export CUDA_HOME="$cuda_root"          # cudarc's link search path (lib/)
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CUDAFORGE_THREADS="$JOBS"       # nvcc processes in candle-kernels' build script
export CARGO_TARGET_DIR="$CUDA_TARGET_DIR"
nvcc --version | tail -n 2
command -v "${CXX:-g++}" >/dev/null && "${CXX:-g++}" --version | head -n 1

cd "$REPO_ROOT"

# --- 3. check and clippy -----------------------------------------------------------------------
log "cargo check --features $FEATURES"
cargo check -j "$JOBS" --workspace --all-targets --features "$FEATURES"

log "cargo clippy --features $FEATURES -- -D warnings"
cargo clippy -j "$JOBS" --workspace --all-targets --features "$FEATURES" -- -D warnings

# --- 4. link (only with a libcuda.so) ----------------------------------------------------------
if [[ -n "${CUDA_LIBCUDA_DIR:-}" ]]; then
  log "cargo build --release -p ddim-cli --features cuda (links against $CUDA_LIBCUDA_DIR/libcuda.so)"
  cargo build -j "$JOBS" --release -p ddim-cli --features cuda
else
  log "link step skipped: no PyPI wheel ships libcuda.so; set CUDA_LIBCUDA_DIR to a folder with one"
fi

log "cuda build check passed (CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p'), compute cap $CUDA_COMPUTE_CAP)"
