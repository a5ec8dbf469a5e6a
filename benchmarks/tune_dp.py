"""Choose DP hyper-parameters on public data only: a proxy client and a validation split cut from training images
that no client holds in the DP benchmark (``bench_dp_fed`` partitions only the first 55,000 training images).

The last 5,000 Fashion-MNIST training images are split in two halves: the
first half plays one client (IID, 250 images per class: fewer than an average
benchmark client, so the proxy is pessimistic), the second half scores the
client's set. With ``--init public`` the proxy client is its first 2,000
images and the distiller starts from the next 500 (its public pool, as the
benchmark's clients start from images none of them holds); ``--steps 0``
then scores that start alone. No private benchmark image and no test image
is read, so the choice costs no privacy and does not peek at the test split.
One call runs one setting and appends a JSON line to
``benchmarks/results/dp-tuning.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from rich.console import Console

from benchmarks.common import RESULTS, command, hardware
from fedistill.data import load_dataset
from fedistill.distill import DistillSettings, get_distiller
from fedistill.distill.private import public_start
from fedistill.models import ModelSpec, build_model
from fedistill.privacy import PrivacyLedger, PrivateData, calibrate_noise_multiplier, release_class_counts
from fedistill.privacy.dpsgd import dp_sgd
from fedistill.training import TrainSettings, evaluate_model, evaluate_set

PUBLIC_START = 55_000
"""Training images from here on are never partitioned among clients in the DP benchmark."""

COUNT_NOISE = 20.0
PRESENCE_SIGMAS = 3.0

PROXY_PUBLIC = (2000, 2500)
"""With ``--init public``: the proxy client's public pool, rows ``[2000, 2500)`` of the public split."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=["dp-dm", "dp-gm", "dp-sgd"], required=True)
    parser.add_argument("--epsilon", type=float, required=True)
    parser.add_argument("--steps", type=int, required=True, help="iterations (distillers) or epochs (dp-sgd)")
    parser.add_argument("--sample-rate", type=float, required=True)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=None, help="image lr (distillers) or model lr (dp-sgd)")
    parser.add_argument("--outer-loop", type=int, default=None)
    parser.add_argument("--init", choices=["noise", "public"], default="noise", help="distillers' starting images")
    parser.add_argument("--eval-epochs", type=int, default=100)
    parser.add_argument("--eval-dsa", action="store_true")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--factor", type=int, default=1, help="dp-dm: tiles per stored image side (IDC-style)")
    parser.add_argument("--replay-steps", type=int, default=0,
                        help="dp-dm: image steps against kept releases per release")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    train = load_dataset("fashion-mnist", "train")
    pool = train.subset(np.arange(PUBLIC_START, len(train)))
    public = args.init == "public"
    client = pool.subset(np.arange(0, PROXY_PUBLIC[0] if public else PROXY_PUBLIC[1]))
    validation = pool.subset(np.arange(PROXY_PUBLIC[1], len(pool)))
    spec = ModelSpec(width=args.width)
    images, labels = client.normalized(), torch.from_numpy(client.labels)
    val_x, val_y = validation.normalized(), torch.from_numpy(validation.labels)
    settings = DistillSettings(
        ipc=10, iterations=args.steps, init=args.init, lr_images=args.lr, dsa=True,
        dsa_strategy="color_crop_cutout_scale_rotate", outer_loop=args.outer_loop, compile="auto",
        factor=args.factor, replay_steps=args.replay_steps,
    )
    if args.method == "dp-sgd":
        releases = args.steps * max(1, int(1 / args.sample_rate))
    else:
        releases = get_distiller(args.method).releases(settings)  # type: ignore[attr-defined]
    prior = [(COUNT_NOISE, 1.0, 1)]
    sigma = calibrate_noise_multiplier(args.epsilon, 1e-5, args.sample_rate, releases, prior=prior) if releases else 0.0
    ledger = PrivacyLedger(delta=1e-5)
    generator = torch.Generator().manual_seed(0)
    counts = release_class_counts(client.labels, 10, ledger, COUNT_NOISE, generator, 1, PRESENCE_SIGMAS)
    privacy = PrivateData(counts, args.sample_rate, args.clip, sigma, ledger, generator, 1)
    started = time.perf_counter()
    if args.method == "dp-sgd":
        model = build_model(spec, (1, 28, 28), 10)
        dp_sgd(model, images, labels, privacy, args.steps, args.lr or 0.1, 0.9)
        accuracy, _ = evaluate_model(model, val_x, val_y)
        work = time.perf_counter() - started
    else:
        start = None
        if public:
            start_pool = pool.subset(np.arange(*PROXY_PUBLIC))
            start = public_start(start_pool, privacy.budgets(10), torch.Generator().manual_seed(1), device,
                                 args.factor)
        distiller = get_distiller(args.method)(spec, settings, device, privacy=privacy, start=start)
        syn = distiller(images, labels, 10, seed=0)
        work = time.perf_counter() - started
        train_settings = TrainSettings(epochs=args.eval_epochs, dsa_strategy="color_crop_cutout_scale_rotate"
                                       if args.eval_dsa else None)
        accuracy = evaluate_set(syn, val_x, val_y, spec, train_settings, device, seed=11, num_nets=1).mean
    row = {
        **{key: value for key, value in vars(args).items() if key != "threads"},
        "noise_multiplier": sigma,
        "spent_epsilon": ledger.epsilon().value,
        "validation_accuracy": accuracy,
        "work_seconds": work,
        "command": command(),
        "hardware": hardware(),
    }
    with (RESULTS / "dp-tuning.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    Console(stderr=True).print(row)


if __name__ == "__main__":
    main()
