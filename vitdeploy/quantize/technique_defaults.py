"""Which accuracy techniques a build uses by default (a module of its own so the CLI can show the
defaults without importing torch; the techniques are in techniques.py)."""

# Defaults: every technique is OFF. Measured with benchmarks/ablation.py (max calibration, 512
# images, TensorRT form; agreement with FP32 on cifar10_vit's first 5,000 test images / mnist_vit's
# 0–4999; KL = mean KL(FP32 ‖ quantized) of the output distributions; torch 2.14.1):
#
#                                    plain        +shift       +rescale     +bias corr.  all
#   (a) INT8, every Linear/Conv and both attention matmuls
#     cifar10_vit agreement %       98.64        98.90        98.66        98.60        99.14
#                 KL ×1e3            0.41         0.16         0.39         0.41         0.14
#     mnist_vit   agreement %       99.96        99.92        99.90        99.84        99.96
#                 KL ×1e3            0.18         0.11         0.18         0.20         0.08
#   (b) W4A4 on the same layers
#     cifar10_vit agreement %       65.92        84.94        65.66        64.88        85.12
#     mnist_vit   agreement %       97.14        97.82        97.18        96.58        97.98
#
# The shift carries most of it, through the shifted softmax (attention.py): at INT8 it cuts the
# logit KL by 60 % on both models. Off by default on TensorRT targets: the Sub it puts
# between Softmax and its Q/DQ is outside the fused INT8 MHA pattern, a speed cost no machine
# here can measure; on cpu (uint8 softmax, free in ONNX Runtime) the default plan's mnist_vit
# build measured 99.82 % agreement with all three against 99.86 % without (2 images of 5,000).
# Rescale alone moves nothing at 8 bits (these models' LayerNorm outputs have no outlier channels);
# bias correction alone never helps and is worse on mnist_vit (INT8: 6 images broken, none fixed,
# McNemar p = 0.03; matching each layer's measured output mean instead did no better). Both help
# only on top of the shift, if at all. So they are switches (--shift, --rescale,
# --bias-correction) for harder models and bit widths, recorded in build.json; a default build is
# unchanged.
DEFAULT_SHIFT = False
# ...except in a build, where the shift is on by default for every INT8 target since the real
# ImageNet ViT (2026-12-02, measured plan):
# - cpu (fused kernels, x86 AVX512-VNNI), with the shifted softmax (a uint8 quantizer there, free in
#   ONNX Runtime): timm ViT-Tiny, 488 held-out samples: top-1 78.07 -> 80.12 % (FP32 81.35),
#   agreement 88.11 -> 94.67 %; cifar10_vit (10,000 test images) 98.68 -> 99.12 %; mnist_vit (5,000)
#   99.84 -> 99.84 %.
# - TensorRT targets: the channel shift only (the Sub before a Linear's QuantizeLinear, a pointwise
#   op TensorRT fuses with the quantize), with the attention matmuls in FP16 (plan.py's
#   role_defaults): Q/DQ in float, as TensorRT computes, jetson-orin: ViT-Tiny (PyTorch fake-quant,
#   488 held-out samples) agreement 89.14 -> 95.70 %, top-1 77.87 -> 81.15 % (FP32 81.35);
#   cifar10_vit 98.68 -> 99.43 %; mnist_vit 99.86 -> 99.94 %. The softmax shift stays opt-in there
#   (explicit --shift with INT8 attention in a plan): it is outside the fused-MHA pattern.
# Since then the attention matmuls are FP16/float by default on every target (plan.py's
# role_defaults, measured there), so the softmax shift only acts where a plan makes attention INT8.
DEFAULT_SHIFT_BUILD = True
DEFAULT_RESCALE = False
DEFAULT_BIAS_CORRECTION = False


def default_softmax_shift(target) -> bool:
    """Whether the shift, when on by default, also shifts the softmax output: on cpu only (see above)."""
    return getattr(target, "qdq_placement", None) == "onnxruntime"
