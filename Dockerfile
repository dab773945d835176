# vitdeploy on a desktop/server NVIDIA GPU, on NVIDIA's TensorRT container.
#
#   docker build -t vitdeploy .
#   docker run --rm --gpus all -v "$PWD/engines:/workspace/vitdeploy/engines" vitdeploy vitdeploy demo
#   docker run --rm --gpus all vitdeploy python -m pytest -q -m trt tests/gpu      # real TensorRT tests
#
# Base: nvcr.io/nvidia/tensorrt:24.10-py3 -- Ubuntu 22.04, Python 3.10, CUDA 12.6, TensorRT 10.5
# with its Python bindings (see NVIDIA's "TensorRT Container Release Notes", release 24.10). It
# needs an NVIDIA driver new enough for CUDA 12.6 on the host (560+, or a data-center branch with
# forward compatibility) and the NVIDIA Container Toolkit (`--gpus all`). Engines built in here
# only run with this TensorRT version on this GPU model; rebuild them after changing the tag:
#   docker build --build-arg TRT_IMAGE=nvcr.io/nvidia/tensorrt:<yy.mm>-py3 -t vitdeploy .
ARG TRT_IMAGE=nvcr.io/nvidia/tensorrt:24.10-py3
FROM ${TRT_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/vitdeploy

# The same install as the README: an editable install with the dev extra (PyPI torch, timm,
# onnx, onnxruntime, Polygraphy -- which runs the engines and loads the container's libcudart -- pytest). Only the project's sources are copied, not a local .venv or engines.
COPY pyproject.toml README.md Makefile ./
COPY vitdeploy ./vitdeploy
COPY jetson ./jetson
COPY benchmarks ./benchmarks
COPY calib ./calib
COPY tests ./tests
RUN python3 -m pip install --upgrade pip \
 && python3 -m pip install -e ".[dev]" \
 && python3 -c "import tensorrt, vitdeploy; print('TensorRT', tensorrt.__version__)"

CMD ["vitdeploy", "--help"]
