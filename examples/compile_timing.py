"""Eager against torch.compile (inductor) timings of a converted ResNet-18, forward and
backward, on the CPU: ``python examples/compile_timing.py [--batch 8 --size 64]``.

Uses the ResNet-18 written out in tests/torch_models.py (run from a clone).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastpool.torch  # noqa: E402
from tests.torch_models import resnet18  # noqa: E402


def step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()


def timed(model, x, repeats):
    step(model, x)  # warm-up (and, compiled, the compile)
    start = time.perf_counter()
    for _ in range(repeats):
        step(model, x)
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for name, model in (("torch", resnet18()), ("fastpool", fastpool.torch.convert(resnet18()))):
        eager = timed(model, x, args.repeats)
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled = torch.compile(model, backend="inductor")
        step(compiled, x)
        compile_s = time.perf_counter() - start
        rows.append((name, eager, timed(compiled, x, args.repeats), compile_s))
    print(f"ResNet-18, input {tuple(x.shape)}, forward+backward, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'pooling':10s} {'eager ms':>9s} {'inductor ms':>12s} {'compile s':>10s}")
    for name, eager, compiled, compile_s in rows:
        print(f"{name:10s} {1e3 * eager:9.1f} {1e3 * compiled:12.1f} {compile_s:10.1f}")


if __name__ == "__main__":
    main()
