"""DP gradient matching's outer step: per-record gradients by ``torch.func`` (shipped) against Opacus' hooks.

One outer step of ``dp-gm`` is: per-record gradients of a Poisson sample of
real records (about ``q`` times a client's data), clipped per-class sums,
the synthetic side's per-class gradients with a double backward, and the
inner training loop on the synthetic set. The reference is the code before
2026-12-07: Opacus' ``GradSampleModule`` wraps the network, its hooks are
enabled for the real pass only but stay registered for the rest of the step.
Both run on the same Fashion-MNIST records, the same network weights and
the same synthetic set; the two alternate step by step so that machine
noise hits both alike, and the ratio of medians is reported (whole step and
the per-record part alone). Noise is left out: it is the same cost in both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from benchmarks.common import hardware, write_result
from fedistill.augment import SiameseAugment
from fedistill.data import load_dataset
from fedistill.device import pick_device
from fedistill.distill.embedding import random_network
from fedistill.distill.gm import gradient_distance, train_on_set
from fedistill.models import ModelSpec
from fedistill.privacy import clipped_class_sums, per_record_gradients

PerRecord = Callable[[nn.Module, list[nn.Parameter], torch.Tensor, torch.Tensor], torch.Tensor]


def opacus_per_record(per_record: GradSampleModule) -> PerRecord:
    """The reference: the hooks on for the real pass, off (but registered) afterwards, as DP-GM did."""

    def gradients(
        net: nn.Module, parameters: list[nn.Parameter], real: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        per_record.enable_hooks()
        F.cross_entropy(per_record(real), targets, reduction="sum").backward()
        per_record.disable_hooks()
        grads = torch.cat([p.grad_sample.reshape(len(real), -1) for p in parameters], dim=1)
        for p in parameters:
            p.grad, p.grad_sample = None, None
        return grads

    return gradients


def outer_step(
    net: nn.Module, gradients: PerRecord, real: torch.Tensor, targets: torch.Tensor, syn: torch.Tensor,
    syn_labels: torch.Tensor, ipc: int, augment: SiameseAugment, generator: torch.Generator, inner_loop: int,
    sync: Callable[[], None],
) -> tuple[float, float]:
    """One DP-GM outer step without the noise; returns (per-record seconds, whole-step seconds)."""
    parameters = list(net.parameters())
    sync()
    start = time.perf_counter()
    grads = gradients(net, parameters, real, targets)
    sums = clipped_class_sums(grads, targets, 10, 1.0)
    sync()
    record_seconds = time.perf_counter() - start
    real_grads = (sums / max(1, len(real) // 10)).float()
    loss = syn.new_zeros(())
    sizes = [p.numel() for p in parameters]
    for cls in range(10):
        own = augment(syn[cls * ipc : (cls + 1) * ipc], generator)
        syn_loss = F.cross_entropy(net(own), torch.full((ipc,), cls, device=syn.device))
        syn_grads = torch.autograd.grad(syn_loss, parameters, create_graph=True)
        target = [part.reshape(p.shape) for part, p in zip(real_grads[cls].split(sizes), parameters, strict=True)]
        loss = loss + gradient_distance(list(syn_grads), target)
    loss.backward()
    syn.grad = None
    optimizer = torch.optim.SGD(parameters, lr=0.01)
    train_on_set(net, optimizer, syn.detach(), syn_labels, inner_loop, augment, generator, 256)
    sync()
    return record_seconds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--records", type=int, default=550, help="real records per release (q 0.1 of a 5,500-record client)"
    )
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--inner-loop", type=int, default=10)
    parser.add_argument("--width", type=int, default=64, help="ConvNet-3 width (the DP benchmarks' 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed outer steps per implementation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--record", action="store_true", help="write benchmarks/results/dp-gm-outer-step-speedup.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    train = load_dataset("fashion-mnist", "train")
    generator = torch.Generator().manual_seed(0)
    rows = torch.randperm(len(train.labels), generator=generator)[: args.records].numpy()
    real = train.subset(rows).normalized(device)
    targets = torch.from_numpy(train.labels[rows]).long().to(device)
    syn = torch.randn(10 * args.ipc, *real.shape[1:], generator=generator).to(device).requires_grad_(True)
    syn_labels = torch.arange(10, device=device).repeat_interleave(args.ipc)
    augment = SiameseAugment("color_crop_cutout_flip_scale_rotate")
    spec = ModelSpec(width=args.width, depth=3, norm="instancenorm", hidden=128)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[tuple[float, float]]] = {"opacus hooks": [], "torch.func": []}
    for step in range(args.steps + 1):
        for name in times:
            net = random_network(spec, real.shape[1:], 10, torch.Generator().manual_seed(step), device, trainable=True)
            per_record = None
            if name == "opacus hooks":
                per_record = GradSampleModule(net, batch_first=True, loss_reduction="sum", strict=True)
                per_record.disable_hooks()
                gradients = opacus_per_record(per_record)
            else:
                gradients = per_record_gradients
            seconds = outer_step(net, gradients, real, targets, syn, syn_labels, args.ipc, augment,
                                 torch.Generator().manual_seed(step), args.inner_loop, sync)
            if per_record is not None:
                per_record.remove_hooks()
            if step >= 1:
                times[name].append(seconds)
    medians = {
        name: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for name, v in times.items()
    }
    for name, (record, whole) in medians.items():
        print(f"{name:14s} per-record {record:.3f} s   whole outer step {whole:.3f} s (median of {args.steps})")
    record_ratio = medians["opacus hooks"][0] / medians["torch.func"][0]
    step_ratio = medians["opacus hooks"][1] / medians["torch.func"][1]
    threads = torch.get_num_threads()
    print(f"hardware: {hardware()}")
    print(f"speedup (ratio of medians): per-record {record_ratio:.2f}x, whole outer step {step_ratio:.2f}x")
    if args.record:
        path = write_result(
            "dp-gm-outer-step-speedup", round(step_ratio, 2), "x (ratio of median seconds per DP-GM outer step)",
            f"ConvNet-3 width {args.width} instance norm, {args.records} Fashion-MNIST records per release, IPC "
            f"{args.ipc}, inner loop {args.inner_loop}, DSA, {threads} torch threads; Opacus GradSampleModule "
            f"{medians['opacus hooks'][1]:.2f} s vs torch.func {medians['torch.func'][1]:.2f} s per step; per-record "
            f"part {medians['opacus hooks'][0]:.2f} s vs {medians['torch.func'][0]:.2f} s ({record_ratio:.2f}x); "
            f"median of {args.steps} alternating steps",
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
