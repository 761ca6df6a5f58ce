"""The three commands of ``hebbloss``: train, probe, run (Miconi 2021 pipeline: Hebbian training of a
network, then linear probes of each layer next to a random-weights baseline).

Every check (settings, dataset, model, results folder, checkpoint) runs before anything is written,
so bad input leaves the disk as it was.
"""
from __future__ import annotations

import inspect
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from .. import __version__, checkpoint
from . import build, config, report
from . import distributed
from .. import distributed as hebbloss_distributed
from .config import ConfigError
from .preprocess import Preprocess
from .train import TrainState, progress_to_state, run_training, save_checkpoint

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"
RESULTS_ROOT = "hebbloss-results"
_NOT_SETTINGS = {"command", "config", "resume", "run_dir"}


# ----------------------------------------------------------------------------------------------- settings
def _flags(args) -> Dict[str, Any]:
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    for key in ("layer_lr", "model_args"):
        if key in flags:
            flags[key] = dict(flags[key])
    if "baselines" in flags:
        flags["baselines"] = [] if [b.lower() for b in flags["baselines"]] == ["none"] else list(flags["baselines"])
    if getattr(args, "config", None):
        flags = {**config.read_file(args.config), **flags}
    if "feature_memory" in flags:  # checked now, before anything is trained or written
        flags["feature_memory"] = config.parse_bytes(flags["feature_memory"], "--feature-memory")
    epochs = flags.get("readout_epochs")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
        raise ConfigError(f"--readout-epochs {epochs!r}: must be a positive number of epochs")
    return flags


def _new_folder(cfg: Dict[str, Any], command: str) -> Path:
    """The results folder of a new run; refuses one that already holds files, saying how to continue it
    (``--resume``, ``probe --run``) only when it is a results folder those accept."""
    if cfg.get("out"):
        folder = Path(cfg["out"])
    else:
        name = cfg.get("name") or "-".join([
            str(cfg.get("model") or build.default_model()).replace(":", "-"),
            str(cfg.get("dataset") or _default_dataset()),
            time.strftime("%Y%m%d-%H%M%S"),
        ])
        folder = Path(RESULTS_ROOT) / name
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        trained = (folder / CONFIG).is_file() and (folder / CHECKPOINT).is_file()
        if trained and command == "probe":
            advice = f"probe that trained run with: hebbloss probe --run {folder}, or choose another --out or --name"
        elif trained:
            advice = f"continue that run with: hebbloss {command} --resume {folder}, or choose another --out or --name"
        else:
            missing = " and no ".join(n for n in (CONFIG, CHECKPOINT) if not (folder / n).is_file())
            what = "is not a folder" if not folder.is_dir() else f"is not the results folder of a trained run (it has no {missing})"
            advice = f"it {what}, so it cannot be resumed: choose another --out or --name, or empty it first"
        raise ConfigError(f"results folder {folder} already exists and is not empty; nothing was overwritten. {advice[0].upper()}{advice[1:]}")
    return folder


def _resume_folder(path: str) -> Tuple[Path, Path]:
    p = Path(path)
    folder, ckpt = (p.parent, p) if p.suffix == ".pt" else (p, p / CHECKPOINT)
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not a hebbloss results folder (no {CONFIG}); pass the folder a previous run wrote")
    return folder, ckpt


def _default_dataset() -> str:
    from ..data import DEFAULT_DATASET

    return DEFAULT_DATASET


def _load_data(cfg: Dict[str, Any]):
    from ..data import ImageDataset, load_dataset

    ds = load_dataset(cfg.get("dataset") or _default_dataset(), data_dir=cfg.get("data_dir"),
                      download=bool(cfg.get("download")), cache_dir=cfg.get("cache_dir"))
    limit = cfg.get("limit")
    if limit:
        if int(limit) < 1:
            raise ConfigError(f"--limit {limit}: must be a positive number of images")
        g = torch.Generator().manual_seed(int(cfg.get("seed") or 0))
        tr = torch.randperm(len(ds.train_labels), generator=g)[: int(limit)]
        te = torch.randperm(len(ds.test_labels), generator=g)[: int(limit)]
        ds = ImageDataset(ds.train_images[tr], ds.train_labels[tr], ds.test_images[te], ds.test_labels[te], ds.classes, ds.name)
    return ds


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def _build(cfg: Dict[str, Any], ds) -> build.Built:
    _seed(int(cfg.get("seed") or 0))
    model, probe_default, recipe = build.create_model(cfg, tuple(ds.train_images.shape[1:]), ds.name)
    model.to(cfg.get("device") or "cpu")
    built = build.build_reference(cfg, model, recipe, probe_default) if recipe is not None else build.build_generic(cfg, model, probe_default)
    try:
        _check_probe_layers(built.model, built.probe_layers, cfg)
    except Exception:
        built.plastic.remove()
        raise
    return built


def _paper_method(method) -> bool:
    from ..probe.evaluate import PAPER_METHODS

    return method in PAPER_METHODS


def _check_probe_layers(model, probe_layers, cfg) -> None:
    """Unknown --probe-layers, or a paper readout (--method) the model has not, fail now, before any
    training, with the model's layer names or the known readouts."""
    from ..probe.evaluate import paper_readout
    from ..probe.features import resolve_layers

    readout = paper_readout(cfg.get("method") or "ridge", model)
    if readout is not None and not cfg.get("probe_layers"):
        probe_layers = list(readout.layers(model).values())
    resolve_layers(model, probe_layers)


# ----------------------------------------------------------------------------------------------- commands
def _read_resume(path: str, flags: Dict[str, Any]):
    """(folder, checkpoint path, settings, checkpoint state) of the run ``--resume`` continues."""
    folder, ckpt_path = _resume_folder(path)
    saved_cfg = config.read_file(folder / CONFIG)
    config.check_resume_overrides(saved_cfg, flags, folder)
    cfg = config.merge(saved_cfg, {k: v for k, v in flags.items() if k in config.RESUMABLE})
    cfg["max_steps"] = flags.get("max_steps")  # a limit of one invocation, never inherited
    return folder, ckpt_path, cfg, checkpoint.load(ckpt_path)


def train(args, then_probe: bool = False) -> int:
    """``hebbloss train``: Hebbian training with atomic checkpoints; ``--resume`` continues exactly.
    Under torchrun, one job over all processes (``hebbloss.cli.distributed``); rank 0 alone writes."""
    ranks = distributed.start()
    try:
        return _train(args, then_probe, ranks)
    finally:
        ranks.close()


def _train(args, then_probe: bool, ranks: distributed.Ranks) -> int:
    flags = _flags(args)
    state, saved = TrainState(), None
    if args.resume:  # rank 0 reads the results folder: the other ranks need not see it
        folder, ckpt_path, cfg, saved = ranks.on_main(lambda: _read_resume(args.resume, flags))
    else:
        cfg = build.resolve_model(config.merge(flags))
        folder = ranks.on_main(lambda: _new_folder(cfg, args.command))  # one name (its timestamp) for all ranks
        ckpt_path = folder / CHECKPOINT
    try:
        ds = _load_data(cfg)
        built = _build(cfg, ds)
        generator = torch.Generator().manual_seed(int(cfg.get("seed") or 0))
        if saved is not None:
            progress = checkpoint.restore_training_state(saved, built.model, built.plastic, built.optimizer, generator, path=ckpt_path)
            state = progress_to_state(progress)
        prepare = _preprocess(cfg, ds, saved, ckpt_path, built.zca)
        epochs = int(cfg["epochs"]) if cfg.get("epochs") is not None else built.epochs
        if cfg.get("max_steps") is not None and int(cfg["max_steps"]) < 1:
            raise ConfigError(f"--max-steps {cfg['max_steps']}: must be a positive number of steps")
        distributed.check_device(cfg.get("device"), ranks)
    except Exception:
        ranks.agree(False)
        raise
    if not ranks.agree(True):
        raise RuntimeError("another process of this torchrun job failed its checks (its error is in its output); nothing was written")
    # what this run uses, the defaults made explicit (building from it again gives the same run)
    cfg = {**build.explicit_settings(cfg, built), "dataset": cfg.get("dataset") or _default_dataset(), "epochs": epochs}
    device = cfg.get("device") or "cpu"
    prepare = prepare.to(device)
    if ranks.parallel:
        _parallel_batch_norm(built.model, device, ranks, len(ds.train_labels), int(cfg.get("batch_size") or built.batch_size))
        hebbloss_distributed.broadcast_state(built.model, built.plastic, prepare)  # every rank starts from rank 0's state
    # All checks passed: from here on files are written.
    if ranks.main:
        folder.mkdir(parents=True, exist_ok=True)
        config.write(folder / CONFIG, cfg)
        print(f"hebbloss: training {cfg.get('model') or build.default_model()} on {ds.name} "
              f"({len(ds.train_labels)} images) for {epochs} epochs -> {folder}"
              + (f" ({ranks.world_size} processes, global batch {cfg.get('batch_size') or built.batch_size})" if ranks.parallel else ""))

    def save(s: TrainState) -> None:
        if ranks.main:
            save_checkpoint(ckpt_path, built.model, built.plastic, built.optimizer, generator, s, cfg, prepare)

    summary = run_training(
        built.model, built.plastic, built.optimizer, ds.train_images, prepare, epochs=epochs,
        batch_size=int(cfg.get("batch_size") or built.batch_size), generator=generator, state=state, save=save,
        checkpoint_every=cfg.get("checkpoint_every"), max_steps=cfg.get("max_steps"), after_step=built.after_step,
        warmup_steps=built.warmup_steps, augment=built.augment,
        device=device, progress=bool(cfg.get("progress", True)) and ranks.main, ranks=ranks,
    )
    ranks.close()  # what follows (report, probe) is rank 0's alone
    if not ranks.main:
        return 130 if summary["interrupted"] else 0
    report.update_results(folder, hebbloss_version=__version__, config=cfg, dataset=_describe(ds),
                          model={"name": cfg.get("model") or build.default_model(), **built.description},
                          train={**summary, "epochs": epochs, "checkpoint": CHECKPOINT}, world_size=ranks.world_size)
    if not summary["completed"]:
        why = "interrupted" if summary["interrupted"] else f"stopped after --max-steps {cfg.get('max_steps')}"
        print(f"hebbloss: {why} at epoch {state.epoch}, step {state.global_step}; checkpoint {ckpt_path}. "
              f"Continue with: hebbloss {args.command} --resume {folder}")
        return 130 if summary["interrupted"] else 0
    print(f"hebbloss: trained {state.global_step} steps in {summary['seconds']:.1f} s; checkpoint {ckpt_path}")
    if then_probe:
        built.plastic.remove()
        return _probe_and_report(cfg, folder, ds, built.model, built.probe_layers, _first_layer(built), prepare.cpu())
    return 0


def run(args) -> int:
    """``hebbloss run``: train, then probe each layer (with baselines), then write the report."""
    return train(args, then_probe=True)


def probe(args) -> int:
    """``hebbloss probe``: linear probes of a trained run (``--run FOLDER``) or of a freshly built model.
    Under torchrun, rank 0 probes and the other processes end at once."""
    if distributed.probe_rank() != 0:
        return 0
    flags = _flags(args)
    if args.run_dir:
        folder, ckpt_path = _resume_folder(args.run_dir)
        saved_cfg = config.read_file(folder / CONFIG)
        config.check_resume_overrides(saved_cfg, flags, folder)
        cfg = config.merge(saved_cfg, {k: v for k, v in flags.items() if k in config.RESUMABLE})
        if _paper_method(flags.get("method")) and "pool" not in flags:
            cfg["pool"] = None  # a paper readout pools as its paper does, not as the run was probed before
        saved = checkpoint.load(ckpt_path)
        ds = _load_data(cfg)
        built = _build(cfg, ds)
        built.plastic.remove()
        checkpoint.check_fits(built.model, saved["model"], "model", ckpt_path)
        built.model.load_state_dict(saved["model"])
        prepare = _preprocess(cfg, ds, saved, ckpt_path, built.zca)
        model, probe_layers, first = built.model, built.probe_layers, _first_layer(built)
    else:
        cfg = build.resolve_model(config.merge(flags))
        folder = _new_folder(cfg, "probe")
        ds = _load_data(cfg)
        _seed(int(cfg.get("seed") or 0))
        model, probe_default, _ = build.create_model(cfg, tuple(ds.train_images.shape[1:]), ds.name)
        model.to(cfg.get("device") or "cpu")
        probe_layers = build.probe_layers(cfg, probe_default)
        _check_probe_layers(model, probe_layers, cfg)
        from ..selection import select_layers

        first = select_layers(model, cfg.get("layers"))[0]
        prepare = _preprocess(cfg, ds, zca=getattr(getattr(model, "recipe", None), "zca", None))
        cfg["dataset"] = cfg.get("dataset") or _default_dataset()
        folder.mkdir(parents=True, exist_ok=True)
        config.write(folder / CONFIG, cfg)
        report.update_results(folder, hebbloss_version=__version__, config=cfg, dataset=_describe(ds),
                              model={"name": cfg.get("model") or build.default_model(), "trained": False})
    return _probe_and_report(cfg, folder, ds, model, probe_layers, first, prepare)


def _parallel_batch_norm(model, device: str, ranks: distributed.Ranks, images: int, batch_size: int) -> None:
    """BatchNorm layers normalise with the global batch's statistics under data parallelism: on CUDA they
    become torch's SyncBatchNorm (in place; it acts as plain BatchNorm once the process group is left), and
    every rank must then have samples in every batch; on CPU, where SyncBatchNorm does not run, each rank
    uses its own slice's statistics and rank 0 says so."""
    norms = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))]
    if not norms:
        return
    if str(device).startswith("cuda"):
        smallest = min(batch_size, images % batch_size or batch_size)
        if smallest < ranks.world_size:
            raise ConfigError(f"a batch of {smallest} images cannot be shared by {ranks.world_size} processes when the model "
                              f"has BatchNorm layers ({norms[0]}, ...): choose --batch-size and --limit so that every batch, "
                              f"the last of an epoch of {images} images too, has at least {ranks.world_size}")
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the model's BatchNorm children in place
    elif ranks.main:
        print(f"hebbloss: warning: BatchNorm layers ({', '.join(norms[:3])}{', ...' if len(norms) > 3 else ''}) normalise each "
              f"process's slice of the batch by its own statistics on CPU (SyncBatchNorm needs CUDA), so this run differs "
              f"from one process's; use --device cuda for an exact data-parallel run", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- probe + report
def _first_layer(built: build.Built):
    name, module = next(iter(built.plastic.layers.items()))
    return name, module


def _accepted(fn, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _preprocess(cfg, ds, saved=None, path=None, zca=None) -> Preprocess:
    """The run's input preprocessing: from the checkpoint when there is one, else fitted on the training
    images. ``zca``: the recipe's ZCA settings (e.g. Miconi 2021's), used when the run whitens."""
    prepare = Preprocess(zca=(zca or True) if cfg.get("zca") else False)
    if saved is None:
        return prepare.fit(ds.train_images, generator=torch.Generator().manual_seed(int(cfg.get("seed") or 0)))
    if "preprocess" not in saved:
        raise checkpoint.CheckpointError(f"checkpoint {path} holds no input preprocessing; it was not written by `hebbloss train`")
    try:  # a fresh module: a failed load changes nothing that matters
        prepare.load_state_dict(saved["preprocess"])
    except (RuntimeError, KeyError) as e:
        raise checkpoint.CheckpointError(f"the input preprocessing in {path} does not fit this run's settings ({e})") from None
    return prepare


def _probe_and_report(cfg, folder: Path, ds, model, probe_layers, first, prepare: Preprocess) -> int:
    from ..data import ImageDataset
    from ..probe import evaluate

    method = cfg.get("method") or "ridge"
    if _paper_method(method):  # the paper's layers unless --probe-layers names others
        probe_layers = cfg.get("probe_layers") or None
    memory = config.parse_bytes(cfg.get("feature_memory"), "--feature-memory")
    started = time.perf_counter()
    seen = ImageDataset(prepare.apply_in_chunks(ds.train_images), ds.train_labels, prepare.apply_in_chunks(ds.test_images),
                        ds.test_labels, ds.classes, ds.name)  # the inputs exactly as the network saw them in training
    extra = {"device": cfg.get("device") or "cpu",
             "seed": int(cfg.get("seed") or 0), "progress": bool(cfg.get("progress", True)),
             "batch_size": int(cfg.get("batch_size") or 256), "max_feature_bytes": memory}
    if cfg.get("readout_epochs") is not None:
        extra["epochs"] = int(cfg["readout_epochs"])
    result = evaluate(model, seen, probe_layers, method=method, pool=cfg.get("pool"),
                      baselines=tuple(cfg.get("baselines") or ()), **_accepted(evaluate, extra))
    seconds = time.perf_counter() - started
    print(result.table())
    summary = result.to_dict()
    per_network = report.by_network(summary["rows"])
    layers = list(next(iter(per_network.values()), {}))
    chance = 1.0 / max(1, len(ds.classes))
    acc_png = report.plot_accuracy(per_network, folder / report.ACCURACY_PNG,
                                   title=f"{ds.name}: {method} probe per layer", chance=chance)
    name, module = first
    filt_png = report.plot_filters(module, folder / report.FILTERS_PNG, tuple(ds.train_images.shape[1:]),
                                   title=f"{name or '(model)'}: learned filters")
    path = report.update_results(folder, probe={**summary, "seconds": seconds, "layers": layers},
                                 files={"results": report.RESULTS, "accuracy_plot": acc_png.name, "filters_plot": filt_png.name})
    print(f"hebbloss: probed {len(layers)} layers in {seconds:.1f} s; results in {path}, plots {acc_png.name}, {filt_png.name}")
    return 0


def _describe(ds) -> Dict[str, Any]:
    return {"name": ds.name, "train": len(ds.train_labels), "test": len(ds.test_labels),
            "image_shape": list(ds.train_images.shape[1:]), "classes": list(ds.classes)}
