"""Reproduce SoftHebb's tables (Journe et al. 2023, "Hebbian deep learning without feedback", ICLR)
with the library's own command: the network trained by its Hebbian rule for one epoch (batch 10),
then the paper's readout (dropout 0.5 + one linear layer on the last block's flattened output, Adam
1e-3, batch 64, 50 epochs, lr halved at 20/35/50/60/70/80/90 %), beside the same architecture with
random weights and trained end to end by backprop, read the same way.

    python benchmarks/reproduce/softhebb.py                                  # CIFAR-10, depths 3, 1, 2
    python benchmarks/reproduce/softhebb.py --dataset mnist --depths 3
    python benchmarks/reproduce/softhebb.py --variants random --seeds 0 1 2
    python benchmarks/reproduce/softhebb.py --device cuda --seeds 1 2 --depths 3   # on a GPU; rows name their machine

Every finished run is written to benchmarks/results/reproduce/softhebb-DATASET.json at once; runs
already there are skipped; an interrupted Hebbian run resumes from its checkpoint.

Random baseline (``random``), as the authors' code runs it (ray_search.py with ``--training-blocks``
naming only the classifier): the untrained network, the authors' initialisation (radius 25), read with
no pass over the data first. Their model keeps every block it does not train in eval mode
(model.py, ``train(blocks=...)``), so the BatchNorm layers keep their initial running statistics
(mean 0, variance 1) and normalise nothing. ``random-bn-data`` is our own, stronger variant: the same
weights after one forward-only pass over the training epoch (``hebbloss train --warmup-steps`` = all
steps), so BatchNorm holds the data's statistics, as in a Hebbian run with learning rate 0; the paper
has no number for it.
Backprop baseline: the same architecture re-initialised and trained end to end with a linear head by
cross-entropy and Adam (hebbloss.probe.baselines.backprop_copy) for ``--backprop-epochs`` epochs,
then read by the same readout.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import ledger

PAPER = "Journe, Garcia Rodriguez, Guo & Moraitis 2023, Hebbian deep learning without feedback, ICLR (Table 1, Figure 3)"
# The paper's CIFAR-10 linear-readout accuracies (%), by depth (Hebbian blocks): SoftHebb, the same
# network with random weights, and trained end to end by backprop; MNIST from its Table (99.35 ~ 99.4).
PAPER_ACCURACY = {
    "cifar10": {"hebbian": {1: 71.1, 2: 77.7, 3: 80.3}, "random": {1: 64.0, 2: 68.6, 3: 64.6},
                "backprop": {1: 72.4, 2: 82.5, 3: 84.0}},
    "mnist": {"hebbian": {3: 99.4}},
    "fashion-mnist": {},
}
TRAIN_IMAGES = {"cifar10": 50000, "mnist": 60000, "fashion-mnist": 60000}


def variant_name(variant: str, depth: int) -> str:
    return f"depth{depth}" if variant == "hebbian" else variant


def paper_accuracy(dataset: str, variant: str, depth: int):
    return PAPER_ACCURACY.get(dataset, {}).get(variant, {}).get(depth)


def readout_rows(folder: Path, dataset: str, variant: str, depth: int, seed: int, seconds: dict, command: str):
    """The row of a probed run folder (the paper readout on the last block)."""
    results = ledger.results_of(folder)
    (row,) = [r for r in ledger.probe_rows(results) if r["layer"] == f"pool{depth}"]
    return [{"model": "softhebb", "dataset": dataset, "variant": variant_name(variant, depth), "layer": depth,
             "readout": "paper", "seed": seed, "test_accuracy": round(100 * row["test_acc"], 2),
             "train_accuracy": round(100 * row["train_acc"], 2), "features": row["dim"],
             "paper_accuracy": paper_accuracy(dataset, variant, depth),
             "seconds": round(sum(seconds.values()), 1), "phases": {k: round(v, 1) for k, v in seconds.items()},
             "command": command}]


def hebbian_or_random(exp, args, variant: str, depth: int, seed: int):
    """Train (or, for ``random-bn-data``, run forward only) through ``hebbloss train``, then probe."""
    folder = args.work / f"{args.dataset}-{variant}-depth{depth}-seed{seed}"
    log = args.work / "logs" / f"{folder.name}.log"
    common = ["--model", "softhebb", "--model-arg", f"depth={depth}", "--dataset", args.dataset,
              "--data-dir", args.data_dir, "--seed", seed, "--device", args.device]
    train_args = list(common)
    if variant == "random-bn-data":
        train_args += ["--warmup-steps", math.ceil(TRAIN_IMAGES[args.dataset] / 10)]
    train = ledger.train(folder, train_args, log, args.threads)
    seconds = {"hebbian_epoch" if variant == "hebbian" else "statistics_pass": train["seconds"]}
    probe = ["probe", "--run", folder, "--method", "paper", "--probe-layers", f"pool{depth}", "--baselines", "none",
             "--device", args.device, "--no-progress"]
    if args.readout_epochs:
        probe += ["--readout-epochs", args.readout_epochs]
    seconds["features_and_readout"] = ledger.hebbloss(probe, log, args.threads)
    command = ledger.command_line(["train", *train_args]) + " && " + ledger.command_line(probe).replace(str(folder), "RUN")
    return readout_rows(folder, args.dataset, variant, depth, seed, seconds, command)


def api_baseline(exp, args, variant: str, depth: int, seed: int):
    """The baselines read through the API rather than the command: ``random``, the network as created
    (initial weights and BatchNorm statistics), and ``backprop`` (:func:`trained_by_backprop`); either
    is then read by the paper readout on its last block like the Hebbian network."""
    import torch

    import hebbloss
    from hebbloss.data import load_dataset
    from hebbloss.probe import evaluate_paper_readout

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, args.data_dir)
    model = hebbloss.models.create("softhebb", dataset=args.dataset.replace("-", ""), depth=depth, seed=seed).to(args.device)
    seconds = {}
    if variant == "backprop":
        model, seconds["backprop_training"] = trained_by_backprop(model, ds, args, depth, seed)
    started = time.perf_counter()
    x, xt = ds.train_images.float() / 255, ds.test_images.float() / 255
    result = evaluate_paper_readout(model.eval(), "softhebb", x, ds.train_labels, xt, ds.test_labels,
                                    layers=[f"pool{depth}"], seed=seed, device=args.device,
                                    **({"epochs": args.readout_epochs} if args.readout_epochs else {}))
    seconds["features_and_readout"] = time.perf_counter() - started
    r = result[f"pool{depth}"]
    command = (f"python benchmarks/reproduce/softhebb.py --dataset {args.dataset} --depths {depth} "
               f"--variants {variant} --seeds {seed}" + (f" --device {args.device}" if args.device != "cpu" else ""))
    row = {"model": "softhebb", "dataset": args.dataset, "variant": variant, "layer": depth, "readout": "paper",
           "seed": seed, "test_accuracy": round(100 * r.test_acc, 2), "train_accuracy": round(100 * r.train_acc, 2),
           "paper_accuracy": paper_accuracy(args.dataset, variant, depth),
           "seconds": round(sum(seconds.values()), 1), "phases": {k: round(v, 1) for k, v in seconds.items()},
           "command": command}
    if variant == "backprop":
        row["epochs"] = args.backprop_epochs
        row["command"] += f" --backprop-epochs {args.backprop_epochs}"
    if args.readout_epochs:
        row["command"] += f" --readout-epochs {args.readout_epochs}"
    return [row]


def trained_by_backprop(model, ds, args, depth: int, seed: int):
    """(``model`` re-initialised and trained end to end with a linear head, its training seconds): by
    hebbloss.probe.baselines.backprop_copy (Adam 1e-3, batch 128) for ``--backprop-epochs``, saved
    (atomically) once trained and reused afterwards; an interruption during training loses that training."""
    import torch

    from hebbloss import atomic
    from hebbloss.probe.baselines import backprop_copy

    folder = args.work / f"{args.dataset}-backprop-depth{depth}-seed{seed}-e{args.backprop_epochs}"
    saved = folder / "backprop.pt"
    if saved.exists():
        state = torch.load(saved, map_location="cpu")
        model.load_state_dict(state["model"])  # onto the model's own device
        return model, state["seconds"]
    started = time.perf_counter()
    model = backprop_copy(model, ds.train_images, ds.train_labels, len(ds.classes), epochs=args.backprop_epochs,
                          lr=1e-3, seed=seed)
    seconds = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_file(saved) as f:
        torch.save({"model": model.state_dict(), "seconds": seconds}, f)
    return model, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=sorted(TRAIN_IMAGES))
    p.add_argument("--depths", type=int, nargs="+", default=[3, 1, 2])
    p.add_argument("--variants", nargs="+", default=["hebbian", "random"], choices=["hebbian", "random", "random-bn-data", "backprop"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data-dir", type=Path, default=ledger.SHARED)
    p.add_argument("--work", type=Path, default=ledger.ROOT / "hebbloss-reproduce", help="run folders, logs, checkpoints")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    p.add_argument("--device", default="cpu", help="torch device of every phase, e.g. cuda (each row records its hardware)")
    p.add_argument("--backprop-epochs", type=int, default=2,
                   help="epochs of the backprop baseline (2: what fits in about 60 minutes at depth 3 on 2 CPU cores)")
    p.add_argument("--readout-epochs", type=int, default=None, help="override the paper's 50 (quick checks only)")
    p.add_argument("--out", type=Path, default=ledger.RESULTS, help="folder of the results JSON")
    args = p.parse_args(argv)
    if not (args.data_dir / ("cifar10" if args.dataset == "cifar10" else args.dataset)).exists():
        sys.exit(f"softhebb.py: no {args.dataset} under {args.data_dir}; pass --data-dir (see docs/datasets.md)")
    name = f"softhebb-{args.dataset}" + ("" if args.readout_epochs is None else f"-readout{args.readout_epochs}")
    exp = ledger.Experiment(name, {
        "paper": PAPER, "data": ledger.data_description(args.dataset, args.data_dir),
        "hardware": ledger.hardware(args.threads, args.device),
        "command": "python benchmarks/reproduce/softhebb.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {"hebbian": "the recipe softhebb-" + args.dataset + " (hebbloss.models.softhebb): batch 10, 1 epoch",
                   "readout": "paper: dropout 0.5 + linear on the last block, Adam 1e-3, batch 64, "
                              f"{args.readout_epochs or 50} epochs, lr halved at 20/35/50/60/70/80/90 %",
                   "random": "initial weights and BatchNorm statistics (the authors' protocol: no pass over the data)",
                   "random-bn-data": "initial weights; BatchNorm statistics from one forward-only pass over the epoch",
                   "threads": args.threads},
    }, folder=args.out)
    for seed in args.seeds:
        for depth in args.depths:
            for variant in args.variants:
                key = dict(model="softhebb", dataset=args.dataset, variant=variant_name(variant, depth), layer=depth,
                           readout="paper", seed=seed)
                if exp.has(**key):
                    print(f"recorded already: {key}")
                    continue
                print(f"running {key}", flush=True)
                if variant in ("backprop", "random"):
                    rows = api_baseline(exp, args, variant, depth, seed)
                else:
                    rows = hebbian_or_random(exp, args, variant, depth, seed)
                exp.record(rows)
                print(f"recorded {rows}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
