"""fastpool.torch in a model: a small CNN's first training step, its steady step
against the same model on torch's own layers, and the cost of one small call.

    python -m bench.torch_model [--json FILE]

The model (``small_cnn``): a 3x3 stride-2 strided convolution of the image's 3
channels to 32, ReLU, a 3x3 stride-2 max pooling, a 3x3 stride-2 convolution to 64,
ReLU, a 2x2 average pooling, a global average pooling and a linear head; a batch of
8 images of 128x128, channels-first and channels-last.

- **first step**: a fresh process that imports torch and fastpool.torch, then runs
  one forward and one backward: *cold* with an empty numba cache (every kernel
  compiles), *warm* with the cache the cold run left (as every later process).
- **steady step**: milliseconds of a training step (forward, loss, backward), the
  minimum of 7 timings of 10 steps, fastpool's layers and torch's, on torch's thread
  count.
- **small call**: microseconds of ``max_pool2d`` of a 1x4x8x8 tensor, without
  autograd and forward plus backward, fastpool.torch's and torch's.

The machine's noise moves these as it moves the main report's rows: compare numbers
from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_FIRST_STEP = """
import json, sys, time
start = time.perf_counter()
import torch
from bench.torch_model import small_cnn
model, x, y = small_cnn({layout!r})
imported = time.perf_counter()
loss = torch.nn.functional.cross_entropy(model(x), y)
forward = time.perf_counter()
loss.backward()
done = time.perf_counter()
print(json.dumps({{"import": imported - start, "forward": forward - imported,
                  "backward": done - forward, "step": done - imported}}))
"""


def small_cnn(layout: str = "cf", torch_layers: bool = False):
    """The model, an input batch and its labels; ``torch_layers``: torch's own
    convolutions and pooling in place of fastpool.torch's."""
    import torch

    from fastpool.torch import nn as fastpool_nn

    torch.manual_seed(0)
    layers = torch.nn if torch_layers else fastpool_nn
    conv = torch.nn.Conv2d if torch_layers else fastpool_nn.StridedConv2d
    model = torch.nn.Sequential(
        conv(3, 32, 3, 2, 1), torch.nn.ReLU(), layers.MaxPool2d(3, 2, 1),
        conv(32, 64, 3, 2, 1), torch.nn.ReLU(), layers.AvgPool2d(2),
        layers.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = torch.randn(8, 3, 128, 128)
    if layout == "cl":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x, torch.randint(0, 10, (8,))


def first_step(layout: str, cache_dir: str) -> dict:
    """Seconds of the first step's parts in a fresh process with numba's cache in
    ``cache_dir``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir,
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("FASTPOOL_DISABLE_CACHE", None)
    done = subprocess.run([sys.executable, "-c", _FIRST_STEP.format(layout=layout)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _best_ms(step, repeats: int = 7, number: int = 10) -> float:
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            step()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e3


def steady_step(layout: str) -> dict:
    """Milliseconds of a training step on fastpool's layers and on torch's."""
    import torch

    times = {}
    for name, torch_layers in (("fastpool", False), ("torch", True)):
        model, x, y = small_cnn(layout, torch_layers)

        def step():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()

        times[name] = _best_ms(step)
    return times


def small_call() -> dict:
    """Microseconds of one small max pooling, without autograd and forward plus
    backward, fastpool.torch's and torch's."""
    import torch

    from fastpool.torch import functional

    x = torch.rand(1, 4, 8, 8)
    needs_grad = x.clone().requires_grad_()
    times = {}
    for name, pool in (("fastpool", functional.max_pool2d),
                       ("torch", torch.nn.functional.max_pool2d)):
        times[f"{name} no grad"] = _best_ms(lambda: pool(x, 2), number=2000) * 1e3
        times[f"{name} fwd+bwd"] = _best_ms(
            lambda: pool(needs_grad, 2).sum().backward(), number=500) * 1e3
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.torch_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    import torch

    import fastpool
    torch.set_num_threads(fastpool.get_num_threads())
    results = {"first_step": {}, "steady_step_ms": {}, "small_call_us": small_call()}
    for layout in ("cf", "cl"):
        with tempfile.TemporaryDirectory() as cache_dir:
            results["first_step"][layout] = {run: first_step(layout, cache_dir)
                                             for run in ("cold", "warm")}
        results["steady_step_ms"][layout] = steady_step(layout)
    print("first step, s (import / forward / backward):")
    for layout, runs in results["first_step"].items():
        for run, t in runs.items():
            print(f"  {layout} {run:4s}  {t['import']:.2f} / {t['forward']:.2f} / "
                  f"{t['backward']:.2f}   step {t['step']:.2f}")
    print("steady step, ms:")
    for layout, t in results["steady_step_ms"].items():
        print(f"  {layout}  fastpool {t['fastpool']:.2f}  torch {t['torch']:.2f}  "
              f"({t['torch'] / t['fastpool']:.2f}x)")
    print("small call (max_pool2d of 1x4x8x8), us:")
    for name, t in results["small_call_us"].items():
        print(f"  {name:18s} {t:.1f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return results


if __name__ == "__main__":
    main()
