"""Pooling experiments on scikit-learn's 8x8 digits, with fastpool's torch modules.

Small CNNs, identical but for how they downsample and how they pool at the end:

- max pooling (``fastpool.torch.nn.MaxPool2d``) then global average pooling (GAP);
- average pooling (``fastpool.torch.nn.AvgPool2d``) then GAP;
- a strided 2x2 convolution (learned downsampling) then GAP;
- max pooling then generalized-mean (GeM) pooling, written here from torch ops
  and fastpool's global average pooling.

Each is trained with the same seed, data and schedule; the script prints test
accuracy, parameter count and time per epoch, compares a hand-written max pool
with ``torch.nn.MaxPool2d`` and fastpool's, and saves the feature-map hierarchy
(fastpool.viz.plot_feature_hierarchy) of the first max-pooling model's strongest
first-layer feature map of a test digit.

Run ``python examples/pooling_experiments.py`` (images upscaled to 32x32, 12
epochs) or ``--quick`` (16x16, 3 epochs: under a minute on 2 cores).  Needs
``pip install "fastpool[examples]"`` (torch, scikit-learn, tqdm, matplotlib).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from fastpool.torch import functional as FF
from fastpool.torch import nn as fnn
from fastpool.viz import plot_feature_hierarchy


class GeM(nn.Module):
    """Generalized-mean pooling: (mean of x**p)**(1/p) per channel, p learned (p = 1 is
    average pooling, p -> inf max pooling)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x):
        return FF.global_avg_pool2d(x.clamp(min=self.eps).pow(self.p)).pow(1.0 / self.p)


def hand_written_max_pool2d(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Max pooling with stride = kernel, from unfold and amax."""
    return x.unfold(2, k, k).unfold(3, k, k).amax(dim=(-2, -1))


def make_model(down: str, head: str, channels=(16, 32, 64)) -> nn.Sequential:
    layers, cin = [], 1
    for cout in channels:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        layers.append({"max": fnn.MaxPool2d(2), "avg": fnn.AvgPool2d(2),
                       "strided conv": nn.Conv2d(cout, cout, 2, stride=2)}[down])
        cin = cout
    layers.append(GeM() if head == "GeM" else fnn.GlobalAvgPool2d())
    layers.append(nn.Linear(cin, 10))
    return nn.Sequential(*layers)


def load_data(size: int):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0,
                                                        stratify=y)
    return x_train, x_test, y_train, y_test


def train(model, data, epochs: int, batch: int = 64, seed: int = 0):
    x_train, x_test, y_train, y_test = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    times = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for index in torch.randperm(len(x_train), generator=generator).split(batch):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy, sum(times) / len(times)


EXPERIMENTS = [("max", "GAP"), ("avg", "GAP"), ("strided conv", "GAP"), ("max", "GeM")]


def compare_max_pools(size: int, repeats: int = 50) -> None:
    x = torch.randn(64, 16, size, size, generator=torch.Generator().manual_seed(0))
    pools = {"hand-written (unfold + amax)": hand_written_max_pool2d,
             "torch.nn.MaxPool2d": nn.MaxPool2d(2), "fastpool.torch.nn.MaxPool2d":
             fnn.MaxPool2d(2)}
    want = pools["torch.nn.MaxPool2d"](x)
    print(f"\nmax pool 2x2 of a {tuple(x.shape)} batch, forward:")
    for name, pool in pools.items():
        assert torch.equal(pool(x), want), name
        start = time.perf_counter()
        for _ in range(repeats):
            pool(x)
        print(f"  {name:30s} {1e3 * (time.perf_counter() - start) / repeats:7.3f} ms "
              f"(equal to torch's: yes)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="16x16 images and 3 epochs (under a minute)")
    parser.add_argument("--epochs", type=int, help="epochs per model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's (and so fastpool's) thread count; models this small "
                             "run fastest on one")
    parser.add_argument("--figure", default="feature_hierarchy.png",
                        help="where to save the feature-map hierarchy (PNG)")
    args = parser.parse_args(argv)
    size = 16 if args.quick else 32
    epochs = args.epochs or (3 if args.quick else 12)
    torch.set_num_threads(args.threads)  # fastpool.torch follows torch's count
    torch.manual_seed(0)
    data = load_data(size)
    print(f"digits upscaled to {size}x{size}: {len(data[0])} training and {len(data[1])} "
          f"test images, {epochs} epochs, torch threads {torch.get_num_threads()}")
    rows, models = [], {}
    for down, head in tqdm(EXPERIMENTS, desc="models"):
        torch.manual_seed(0)
        model = make_model(down, head)
        accuracy, seconds = train(model, data, epochs)
        models[(down, head)] = model
        rows.append((f"{down} + {head}", sum(p.numel() for p in model.parameters()),
                     accuracy, seconds))
    print(f"\n{'downsampling + head':24s} {'parameters':>10s} {'accuracy':>9s} "
          f"{'s/epoch':>8s}")
    for name, parameters, accuracy, seconds in rows:
        print(f"{name:24s} {parameters:10d} {accuracy:9.3f} {seconds:8.3f}")
    compare_max_pools(size)
    model = models[("max", "GAP")]
    with torch.no_grad():
        features = model[:3](data[1][:1])[0]  # first conv block, before pooling
    strongest = features.flatten(1).amax(1).argmax()
    figure_path = Path(args.figure)
    plot_feature_hierarchy(features[strongest].numpy(), levels=3, path=str(figure_path))
    print(f"\nfeature-map hierarchy (channel {int(strongest)} of the first block) saved to "
          f"{figure_path}")


if __name__ == "__main__":
    main()
