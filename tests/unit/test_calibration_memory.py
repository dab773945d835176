"""Histograms are streamed: peak memory must not grow with the number of calibration images.

Each run is a fresh process (peak RSS is per process). On this model a calibrator that kept the
activations would need about 340 MB more for 512 images than for 64; streaming needs nothing more.
"""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np, timm, torch
    from vitdeploy.load import prepare_for_quantization
    from vitdeploy.inventory import find_layers
    from vitdeploy.artifacts import ModelSpec
    from vitdeploy.quantize.apply import calibrate, quantize_model

    torch.manual_seed(0)
    n, method = int(sys.argv[1]), sys.argv[2]
    model = prepare_for_quantization(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        patch_size=4, embed_dim=128, depth=2, num_heads=4, num_classes=10))
    spec = ModelSpec(name="m", input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)
    qmodel = quantize_model(model, [l.name for l in find_layers(model, spec)], method)
    images = torch.randn(n, 3, 32, 32)
    def loop(m):
        with torch.no_grad():
            for i in range(0, n, 64):
                m(images[i:i + 64])
    start = time.perf_counter()
    calibrate(qmodel, loop)
    # VmHWM is this process's own peak; ru_maxrss can carry the parent's peak over on Linux.
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    print(json.dumps({"peak_mb": peak_kb / 1024, "seconds": time.perf_counter() - start}))
""")


def _peak(n: int, method: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(n), method], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.parametrize("method", ["entropy", "max"])
def test_peak_memory_does_not_grow_with_images(method):
    small, large = _peak(64, method), _peak(512, method)
    assert large - small < 40.0, f"{method}: {small:.0f} MB for 64 images, {large:.0f} MB for 512"
