"""MTT iteration time and peak memory: the shipped memory-flat gradient against plain unrolled autograd.

Both compute the same gradient (``tests/test_mtt.py`` checks they agree in
float64) of MTT's matching loss for a ConvNet student taking ``--syn-steps``
SGD steps on ``--ipc`` Fashion-MNIST images per class (1x28x28, initialised
from real images), optionally with DSA. Timing does not depend on the values
of the start and target parameters, so they are a fresh network and a small
perturbation of it rather than a trained expert. Iterations alternate between
the two implementations, with the same minibatches and augmentation draws,
so that machine noise hits both alike; the ratio of medians is reported
(above 1: memory-flat is faster).

Peak memory is measured in a fresh process per implementation, one
iteration each after a one-step warm-up: on CUDA the allocator's peak above what was allocated before
the iteration, on CPU the growth of the peak resident set size (the kernel's
high-water mark) over the resident size before it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import hardware, write_result
from fedistill.augment import FULL_STRATEGY, SiameseAugment
from fedistill.data import load_dataset
from fedistill.device import pick_device
from fedistill.distill.mtt import (
    FlatNetwork,
    Matching,
    Student,
    StudentStep,
    memory_flat_gradients,
    plan_steps,
    unrolled_gradients,
)
from fedistill.experts import flat_parameters
from fedistill.models import ModelSpec, build_model

RESULT_ID = "mtt-memoryflat-vs-unrolled-speedup"
IMPLEMENTATIONS = {"memory-flat": memory_flat_gradients, "unrolled": unrolled_gradients}


class Problem:
    """One matching problem: the student, the synthetic images, the learning rate, start and target."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        train = load_dataset("fashion-mnist", "train")
        labels = torch.from_numpy(train.labels)
        rows = torch.cat([torch.nonzero(labels == c).flatten()[: args.ipc] for c in range(10)])
        self.images = train.subset(rows.numpy()).normalized(device)
        self.spec = ModelSpec(width=16, depth=2) if args.quick else ModelSpec()
        torch.manual_seed(0)
        net = build_model(self.spec, (1, 28, 28), 10).to(device)
        self.start = flat_parameters(net)
        self.target = self.start + 0.01 * torch.randn_like(self.start)
        self.augment = SiameseAugment(FULL_STRATEGY) if args.dsa else None
        self.student = Student(FlatNetwork(net), labels[rows].to(device), self.augment)
        self.lr = torch.tensor(0.01, device=device)
        self.generator = torch.Generator().manual_seed(1)

    def run(self, name: str, steps: list[StudentStep]) -> Matching:
        return IMPLEMENTATIONS[name](self.student, self.images, self.lr, self.start, self.target, steps)

    def steps(self) -> list[StudentStep]:
        return plan_steps(len(self.images), self.args.syn_steps, None, self.augment, self.generator, self.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(args: argparse.Namespace, name: str) -> int:
    """Bytes one iteration of ``name`` needs at its peak, above what was in use before it (run in a fresh process)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    problem = Problem(args, device)
    steps = problem.steps()
    problem.run(name, steps[:1])  # one-time allocations (kernels, autograd engine) are not the iteration's
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        problem.run(name, steps)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to the current RSS (Linux >= 4.0)
    before = status_bytes("VmRSS")
    problem.run(name, steps)
    return status_bytes("VmHWM") - before


def measure_in_child(args: argparse.Namespace, name: str) -> int:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(peak_memory, args, name).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--syn-steps", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per implementation")
    parser.add_argument("--dsa", action="store_true", help="DSA augmentation on every student step")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a small ConvNet (width 16, depth 2): checks the script")
    parser.add_argument("--record", action="store_true", help=f"write benchmarks/results/{RESULT_ID}.json")
    args = parser.parse_args()
    if args.record and args.quick:
        parser.error("--record measures the default ConvNet; drop --quick")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    problem = Problem(args, device)
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for iteration in range(args.iterations + 1):
        steps = problem.steps()
        for name in IMPLEMENTATIONS:
            sync(device)
            started = time.perf_counter()
            problem.run(name, steps)
            sync(device)
            if iteration > 0:  # the first is warm-up (allocator, kernels)
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    memory = {name: measure_in_child(args, name) for name in IMPLEMENTATIONS}
    speedup = medians["unrolled"] / medians["memory-flat"]
    memory_ratio = memory["unrolled"] / memory["memory-flat"]
    spec = problem.spec
    setting = (
        f"ConvNet-{spec.depth} w{spec.width} {spec.norm}, Fashion-MNIST 1x28x28, IPC {args.ipc} "
        f"(batch = whole set), {args.syn_steps} student steps, dsa={args.dsa}, {device}"
    )
    for name in IMPLEMENTATIONS:
        print(f"{name:12s} median {medians[name]:.3f} s/iteration, peak {memory[name] / 2**20:.1f} MiB")
    print(f"hardware: {hardware()}")
    print(f"setting: {setting}")
    print(f"speedup (unrolled / memory-flat median time): {speedup:.2f}x; memory ratio (unrolled / memory-flat): "
          f"{memory_ratio:.1f}x")
    if args.record:
        path = write_result(
            RESULT_ID, round(speedup, 2), "x (ratio of median s/iteration, unrolled / memory-flat)",
            f"{setting}; memory-flat {medians['memory-flat']:.3f} s/it vs unrolled {medians['unrolled']:.3f} s/it "
            f"over {args.iterations} alternating iterations; peak memory of one iteration: memory-flat "
            f"{memory['memory-flat'] / 2**20:.1f} MiB vs unrolled {memory['unrolled'] / 2**20:.1f} MiB "
            f"(unrolled needs {memory_ratio:.1f}x)",
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
