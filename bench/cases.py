"""The benchmark table: pooling ops on shapes from real networks.

One table feeds the report (``python -m bench``) and the pytest-benchmark tests
(``bench/test_bench.py``).  Shapes are channels-first ``(N, C, *spatial)``;
channels-last runs use the same values laid out ``(N, *spatial, C)``.  A case's
tag names the network and the layer it comes from (``densenet121-transition1``),
or the kind of shape for the older synthetic rows (``vgg``, ``large-kernel``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Case:
    """One op with its arguments on one input shape."""

    op: str  # fastpool / torch.nn.functional family name without the "{nd}d"
    shape: tuple[int, ...]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    tag: str = ""

    @property
    def nd(self) -> int:
        return len(self.shape) - 2

    @property
    def name(self) -> str:
        return f"{self.op}{self.nd}d"

    @property
    def label(self) -> str:
        params = ", ".join([*map(str, self.args), *(f"{k}={v}" for k, v in self.kwargs.items())])
        return f"{self.name}({params})"

    @property
    def layouts(self) -> tuple[bool, ...]:
        # torch has no channels-last memory format for 3-D tensors.
        return (False,) if self.nd == 1 else (False, True)

    def make_input(self, channels_last: bool, seed: int = 0) -> np.ndarray:
        x = np.random.default_rng(seed).standard_normal(self.shape, dtype=np.float32)
        if self.op in ("lp_pool", "gem_pool"):
            np.abs(x, out=x)  # keep the p-th powers real (GeM: post-ReLU features)
        return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channels_last else x


FULL = [
    Case("max_pool", (32, 64, 112, 112), (3, 2, 1), tag="resnet-stem"),
    Case("max_pool", (32, 128, 112, 112), (2, 2), tag="vgg"),
    Case("avg_pool", (32, 128, 112, 112), (2, 2), tag="vgg"),
    Case("max_pool", (1, 64, 56, 56), (2, 2), tag="small-batch"),
    Case("avg_pool", (1, 64, 56, 56), (2, 2), tag="small-batch"),
    Case("lp_pool", (32, 64, 56, 56), (2, 2, 2), tag="lp"),
    Case("max_pool", (16, 64, 16000), (4, 4), tag="audio"),
    Case("avg_pool", (16, 64, 16000), (4, 4), tag="audio"),
    Case("max_pool", (4, 32, 16, 112, 112), (2,), tag="video"),
    Case("avg_pool", (4, 32, 16, 112, 112), (2,), tag="video"),
    Case("max_pool", (8, 64, 56, 56), (7, 1, 3), tag="large-kernel"),
    Case("avg_pool", (8, 64, 56, 56), (7, 1, 3), tag="large-kernel"),
    Case("adaptive_avg_pool", (32, 512, 14, 14), (7,), tag="adaptive"),
    Case("adaptive_max_pool", (32, 512, 14, 14), (7,), tag="adaptive"),
    Case("adaptive_avg_pool", (32, 256, 13, 17), (7,), tag="adaptive-uneven"),
    Case("adaptive_max_pool", (32, 256, 13, 17), (7,), tag="adaptive-uneven"),
    Case("adaptive_avg_pool", (64, 2048, 7, 7), (1,), tag="global"),
    # Layers of well-known networks, as users run them.
    # Classification: DenseNet-121's transition layers halve with a 2x2 average; the
    # 35x35 Inception-v3 blocks' pool branch averages 3x3 without counting the padding.
    Case("avg_pool", (32, 128, 56, 56), (2, 2), tag="densenet121-transition1"),
    Case("avg_pool", (32, 192, 35, 35), (3, 1, 1), {"count_include_pad": False},
         tag="inception3-mixed5b-pool-branch"),
    # Batch-1 inference: ResNet-50's stem and MobileNetV2's global pooling head.
    Case("max_pool", (1, 64, 112, 112), (3, 2, 1), tag="resnet50-stem-maxpool-batch1"),
    Case("adaptive_avg_pool", (1, 1280, 7, 7), (1,), tag="mobilenetv2-head-batch1"),
    # Detection: YOLOv5s's SPPF (three 5x5 stride-1 max pools on the 20x20 map of a
    # 640x640 image), SSD300's pool3 (ceil mode: 75 -> 38) and the extra P6 level of
    # torchvision's FPN (a 1x1 stride-2 max pool on P5 of an 800x1088 image).
    Case("max_pool", (16, 256, 20, 20), (5, 1, 2), tag="yolov5s-sppf"),
    Case("max_pool", (1, 256, 20, 20), (5, 1, 2), tag="yolov5s-sppf-batch1"),
    Case("max_pool", (32, 256, 75, 75), (2, 2), {"ceil_mode": True},
         tag="ssd300-vgg16-pool3-ceil"),
    Case("max_pool", (2, 256, 25, 34), (1, 2, 0), tag="fasterrcnn-fpn-p6-maxpool"),
    # Segmentation: PSPNet's pyramid pooling module (bins 1, 2, 3, 6 on the 60x60
    # ResNet-50 features of a 473x473 crop; bin 1 is also DeepLabv3's image pooling).
    *(Case("adaptive_avg_pool", (4, 2048, 60, 60), (bins,), tag=f"pspnet50-ppm-bin{bins}")
      for bins in (1, 2, 3, 6)),
    # 3-D medical: 3D U-Net's first 2x2x2 max pool (64 channels on a 64^3 patch; batch
    # 1, as volumes are trained: a row stays near a second with the NumPy reference).
    Case("max_pool", (1, 64, 64, 64, 64), (2,), tag="unet3d-encoder1-maxpool"),
    # Video: C3D's pool1 pools space, not time (kernel and stride 1x2x2).
    Case("max_pool", (2, 64, 16, 112, 112), ((1, 2, 2), (1, 2, 2)), tag="c3d-pool1"),
    # Point clouds, channels-first (N, features, points): PointNet's global max over
    # 2048 points of 1024 features, DGCNN's global average beside it.
    Case("adaptive_max_pool", (32, 1024, 2048), (1,), tag="pointnet-global-maxpool"),
    Case("adaptive_avg_pool", (32, 1024, 1024), (1,), tag="dgcnn-global-avgpool"),
    # Audio: M5 (Dai et al. 2017) on raw 8 kHz waveforms, the max pool after its
    # stride-4 first convolution (128 channels, 8000 steps for 4 s).
    Case("max_pool", (32, 128, 8000), (4, 4), tag="m5-raw-audio-pool1"),
    # The newer ops against torch's equivalents: min pooling (torch: -max_pool(-x)),
    # unpooling a 2x2 max pool (SegNet's decoder), fractional max pooling (torch's
    # samples given to both) and GeM, the global head of retrieval models (torch:
    # adaptive_avg_pool(x.clamp(min=eps) ** p) ** (1 / p); args are p and eps).
    Case("min_pool", (32, 64, 112, 112), (3, 2, 1), tag="min-resnet-stem"),
    Case("max_unpool", (16, 64, 56, 56), (2, 2), tag="segnet-decoder-unpool"),
    Case("fractional_max_pool", (32, 64, 56, 56), (3,), {"output_ratio": (0.5, 0.5)},
         tag="fractional-3x3-half"),
    Case("gem_pool", (64, 2048, 7, 7), (3.0, 1e-6), tag="gem-global-resnet50-head"),
    # Strided convolution, the learnable alternative to pooling (no speed bar):
    # args are (out_channels, kernel_size, stride, padding).
    Case("strided_conv", (8, 64, 56, 56), (64, 3, 2, 1), tag="strided-conv"),
    # ... in a 2x2 max pool's place (all-convolutional nets, Springenberg et al. 2015):
    # windows that tile the input, on 32 channels (two vectors of float32).
    Case("strided_conv", (8, 32, 64, 64), (32, 2, 2, 0), tag="strided-conv-2x2-pool"),
]

QUICK = [
    Case("max_pool", (8, 64, 56, 56), (3, 2, 1), tag="resnet-stem"),
    Case("avg_pool", (8, 64, 56, 56), (2, 2), tag="vgg"),
    Case("max_pool", (4, 32, 4000), (4, 4), tag="audio"),
    Case("max_pool", (2, 16, 8, 56, 56), (2,), tag="video"),
    Case("avg_pool", (2, 64, 28, 28), (7, 1, 3), tag="large-kernel"),
    Case("adaptive_avg_pool", (8, 256, 13, 17), (7,), tag="adaptive-uneven"),
    Case("strided_conv", (2, 16, 28, 28), (16, 3, 2, 1), tag="strided-conv"),
    # Smaller instances of the network layers above (the NumPy reference sets the pace).
    Case("avg_pool", (1, 192, 35, 35), (3, 1, 1), {"count_include_pad": False},
         tag="inception3-mixed5b-pool-branch"),
    Case("max_pool", (1, 256, 20, 20), (5, 1, 2), tag="yolov5s-sppf-batch1"),
    Case("adaptive_max_pool", (2, 1024, 1024), (1,), tag="pointnet-global-maxpool"),
]
