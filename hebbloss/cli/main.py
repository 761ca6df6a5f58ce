"""The ``hebbloss`` command: ``train``, ``probe`` and ``run`` (train, then probe, then report).

Local learning rules as losses (Miconi 2021), from the shell::

    hebbloss run                                   # embedded default dataset, default network
    hebbloss run --dataset cifar10 --data-dir DIR  # CIFAR-10 from a local copy
    hebbloss train --model timm:resnet18 --rule oja --post kwta:4 --epochs 2
    hebbloss train --resume hebbloss-results/RUN   # continue an interrupted run exactly
    hebbloss probe --run hebbloss-results/RUN      # layerwise linear-probe table

Every setting is a flag and a key of the YAML file given with ``--config`` (flags win).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .config import ConfigError

S = argparse.SUPPRESS


def _layer_lr(text: str):
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN=LR (e.g. 'conv2=0.01'), got {text!r}")
    try:
        return pattern, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the learning rate in {text!r} is not a number") from None


def _model_arg(text: str):
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. 'channels=[32,64,128]'), got {text!r}")
    return key, yaml.safe_load(value)


def _pool(text: str):
    return int(text) if text.isdigit() else text


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and run")
    g.add_argument("--config", help="YAML file whose keys mirror these flags (flags override it)")
    g.add_argument("--dataset", default=S, help="dataset name (default: the embedded offline dataset); see docs/datasets.md")
    g.add_argument("--data-dir", dest="data_dir", default=S, help="folder holding local copies of datasets")
    g.add_argument("--download", action="store_true", default=S, help="let torchvision download a missing dataset")
    g.add_argument("--cache-dir", dest="cache_dir", default=S, help="where decoded datasets are cached")
    g.add_argument("--limit", type=int, default=S, help="use a random subset of N training and N test images")
    g.add_argument("--zca", action=argparse.BooleanOptionalAction, default=S,
                   help="ZCA-whiten the input, fitted on the training images (default: for miconi2021, as in the paper)")
    g.add_argument("--model", default=S, help="reference network name, or timm:NAME for any timm model")
    g.add_argument("--model-arg", dest="model_args", type=_model_arg, action="append", default=S, metavar="KEY=VALUE",
                   help="keyword argument of the model's builder, VALUE in YAML (e.g. channels=[32,64,128]); repeatable")
    g.add_argument("--seed", type=int, default=S, help="seed of weights, pruning masks and data order (default 0)")
    g.add_argument("--device", default=S, help="torch device, e.g. cpu or cuda (default cpu)")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=S, help="mini-batch size")
    g.add_argument("--out", default=S, help="results folder (default hebbloss-results/NAME); never overwritten")
    g.add_argument("--name", default=S, help="run name (default MODEL-DATASET-TIMESTAMP)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")


def _train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--layers", nargs="+", default=S, help="plastic layers: names, globs or regexes (default: all supported)")
    g.add_argument("--rule", default=S, help="hebb | instar | oja | softhebb, or any rule registered by name in hebbloss.rules (default: the recipe's, else oja)")
    g.add_argument("--post", default=S, help="identity | relu | kwta[:K[:MU]] | softwta[:BETA] | triangle[:POWER] (default: recipe's, else relu)")
    g.add_argument("--lr", type=float, default=S, help="learning rate of every plastic layer")
    g.add_argument("--layer-lr", dest="layer_lr", type=_layer_lr, action="append", default=S, metavar="PATTERN=LR",
                   help="learning rate of the layers matching PATTERN (repeatable; later ones win)")
    g.add_argument("--optimizer", choices=["sgd", "adam"], default=S, help="stock torch optimizer")
    g.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=S,
                   help="take each plastic layer's update during the forward pass and free its activations at once "
                        "(hebbloss.attach(streaming=True)): the same updates, peak memory near inference's (default off)")
    g.add_argument("--prune", type=float, default=S, help="fraction of connections removed at random in plastic layers after the first")
    g.add_argument("--epochs", type=int, default=S, help="epochs of Hebbian training")
    g.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=S,
                   help="first steps that only run forward (adapting k-WTA thresholds), no weight update (default: the recipe's, else 0)")
    g.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=S, help="steps between checkpoints (default 500)")
    g.add_argument("--max-steps", dest="max_steps", type=int, default=S, help="stop after N steps (a checkpoint is written); --resume later")
    g.add_argument("--resume", metavar="FOLDER", help="continue the run whose results folder (or checkpoint.pt) this is")


def _probe_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("probe")
    g.add_argument("--probe-layers", dest="probe_layers", nargs="+", default=S, help="layers to probe (default: the model's feature layers)")
    g.add_argument("--method", choices=["ridge", "logistic", "paper", "softhebb", "miconi"], default=S,
                   help="linear readout (default ridge); paper: the readout of the paper the model comes from "
                        "(softhebb: SoftHebb's dropout + linear layer on each block's flattened output; miconi: "
                        "Miconi 2021's ridge), on the paper's layers and pooling unless --probe-layers / --pool are given")
    g.add_argument("--pool", type=_pool, default=S,
                   help="quadrants | global | flatten | N (NxN grid) (default quadrants, or the paper readout's)")
    g.add_argument("--readout-epochs", dest="readout_epochs", type=int, default=S,
                   help="epochs of the logistic or softhebb readout (default 50, the paper's)")
    g.add_argument("--feature-memory", dest="feature_memory", default=S, metavar="BYTES",
                   help="features held in memory, e.g. 4G or 500M (default: half the memory available now); beyond it "
                        "ridge streams and the other readouts read their features from a disk cache")
    g.add_argument("--baselines", nargs="+", default=S, help="baselines probed in the same harness: random, backprop, or none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hebbloss", description=__doc__.split("\n\n")[0])
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"hebbloss {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,probe,run}")
    train = sub.add_parser("train", help="train a network with a local rule; checkpoints in the results folder")
    probe = sub.add_parser("probe", help="layer-by-layer linear probes of a trained run (--run) or a fresh model")
    run = sub.add_parser("run", help="train, then probe, then report (the default command)")
    for p in (train, probe, run):
        _common(p)
    for p in (train, run):
        _train_flags(p)
    for p in (probe, run):
        _probe_flags(p)
    probe.add_argument("--run", dest="run_dir", metavar="FOLDER", help="results folder of a trained run to probe")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``hebbloss`` console script; returns the exit status (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run"] + argv  # `hebbloss` alone runs the whole pipeline
    args = build_parser().parse_args(argv)
    from . import commands
    from ..checkpoint import CheckpointError

    try:
        return {"train": commands.train, "probe": commands.probe, "run": commands.run}[args.command](args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, TypeError, RuntimeError, ArithmeticError) as e:
        if os.environ.get("HEBBLOSS_DEBUG"):
            raise
        hint = "" if isinstance(e, (ConfigError, CheckpointError, FileNotFoundError)) else " (HEBBLOSS_DEBUG=1 shows the traceback)"
        print(f"hebbloss {args.command}: error: {e}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
