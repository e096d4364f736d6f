#!/usr/bin/env bash
# Build and install pytorch-fast-transformers WITH its CUDA kernels, for an explicit list of GPU
# architectures. Used by docker/Dockerfile and docker/train.def; runs on any machine with a CUDA
# toolkit whose major version matches torch's: nvcc and the CUDA headers, cuRAND's included (the
# nvidia/cuda *-devel images have them). No GPU is needed to build.
#
#   TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=8 bash docker/build_fast_transformers.sh [PYTHON] [VERSION]
#   (FAST_TRANSFORMERS_SDIST=PATH: build that local sdist instead of downloading it)
#
# Why not a plain `pip install pytorch-fast-transformers`:
#  * 0.4.0 is published only as a source distribution whose setup.py imports torch, so it is
#    built with --no-build-isolation in an environment that already has torch.
#  * setup.py gives every CUDA extension `-arch=compute_50`, which CUDA 12+ rejects ("Unsupported
#    gpu architecture 'compute_50'"; CUDA 13 starts at compute_75). The flag is removed, and
#    torch's extension builder then emits one -gencode per entry of TORCH_CUDA_ARCH_LIST.
#  * With no GPU visible at build time (docker build), torch cannot guess the architectures:
#    TORCH_CUDA_ARCH_LIST must be given.
set -euo pipefail

python="${1:-python3}"
version="${2:-0.4.0}"
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
  echo "build_fast_transformers: set TORCH_CUDA_ARCH_LIST, e.g. '8.0;9.0' (A100, H100)" >&2
  exit 2
fi
export TORCH_CUDA_ARCH_LIST
if ! command -v nvcc >/dev/null; then
  echo "build_fast_transformers: nvcc not on PATH; the CUDA kernels cannot be built" >&2
  exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [[ -n ${FAST_TRANSFORMERS_SDIST:-} ]]; then  # a local sdist: no network needed
  cp "$FAST_TRANSFORMERS_SDIST" "$work/pytorch-fast-transformers-${version}.tar.gz"
else
  "$python" -m pip download --quiet --no-deps --no-build-isolation \
    "pytorch-fast-transformers==${version}" -d "$work"
fi
tar -xzf "$work/pytorch-fast-transformers-${version}.tar.gz" -C "$work"
src="$work/pytorch-fast-transformers-${version}"

sed -i 's/extra_compile_args=\["-arch=compute_50"\]/extra_compile_args=[]/' "$src/setup.py"
if grep -q 'compute_50' "$src/setup.py"; then
  echo "build_fast_transformers: setup.py still names compute_50; update the patch" >&2
  exit 1
fi

echo "build_fast_transformers: building ${version} for TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}"
"$python" -m pip install --no-cache-dir --no-deps --no-build-isolation "$src"
# Importing needs no GPU; it fails if the CUDA extension was not built.
"$python" -c "import fast_transformers.causal_product.causal_product_cuda, \
fast_transformers.causal_product.causal_product_cpu; print('fast-transformers CUDA kernels: ok')"
