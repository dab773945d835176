#!/usr/bin/env bash
# Every number in the README's results, in one sequential run (about 40 minutes on 2 cores, plus the
# recovery and QAT ablations at the end: hours).
# Needs ../shared/data for the real models. Logs go to ${1:-bench-logs}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-logs}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
run() { local name=$1; shift; echo "== $name: $*"; "$@" > "$out/$name.log" 2> "$out/$name.err"; tail -n 12 "$out/$name.log"; }
# The real ImageNet ViT-Tiny first: both default builds, its INT8 ceiling, the peers.
run real_vit      "$py" benchmarks/real_vit.py --work "$out/real_vit"
run int8_floor    "$py" benchmarks/int8_floor.py --work "$out/real_vit"
run compare_real  "$py" benchmarks/compare_ort.py --model imagenet_vit_tiny
run real_models   "$py" benchmarks/real_models.py --out "$out/builds"
# The design's table for cifar10_vit: top-1, size, latency percentiles, memory, ratios vs FP32.
run bench_cifar   .venv/bin/vitdeploy bench "$out/builds/cifar10_vit" --data ../shared/data/cifar10/test.npz \
                  --batch 1,8 --threads 2 --runs 200 --png "$out/bench_cifar10_vit.png"
# Entropy calibration's speed (build.json: inputs.calibration.seconds) and accuracy, same 512 images.
run real_models_entropy "$py" benchmarks/real_models.py --calib-method entropy --out "$out/builds_entropy"
run compare_cifar "$py" benchmarks/compare_ort.py --model cifar10_vit
run compare_mnist "$py" benchmarks/compare_ort.py --model mnist_vit
run ablation      "$py" benchmarks/ablation.py
run cpu_speed     "$py" benchmarks/cpu_speed.py
run calib_memory  "$py" benchmarks/calib_memory.py --method entropy
run demo          .venv/bin/vitdeploy demo --out "$out/demo"
# Accuracy recovery's ablation (docs/recovery.md): about an hour for ViT-Tiny's three settings on 2 cores.
run recovery      "$py" benchmarks/recovery.py --json "$out/recovery.json"
# Quantization-aware training at W4A4 (docs/qat.md): about 10 minutes per variant on cifar10_vit.
run qat           "$py" benchmarks/qat.py --json "$out/qat.json"
# Where W4A4 is lost on ViT-Tiny, quantizer group by group (docs/recovery.md): about 12 minutes.
run low_bit_probe "$py" benchmarks/low_bit_probe.py --models imagenet_vit_tiny
