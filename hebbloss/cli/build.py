"""Build what a ``hebbloss`` run trains from its settings: a reference network of ``hebbloss.models``
with its recipe, or any timm model (``timm:NAME``) made plastic by one rule (Miconi 2021), with a
post signal (competition), pruning and per-layer learning rates.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..attach import attach
from ..competition import post_signal
from .. import layers as layer_types, optim
from ..selection import name_matches, select_layers
from .config import ConfigError

GENERIC_DEFAULTS = {"rule": "oja", "post": "relu", "lr": 1e-3, "optimizer": "adam", "epochs": 1, "batch_size": 64}


@dataclass
class Built:
    """A model ready to train: the plasticity handle, its optimizer and what to probe afterwards."""

    model: nn.Module
    plastic: Any
    optimizer: torch.optim.Optimizer
    probe_layers: Optional[List[str]]  # None: the probe's default (timm feature stages, else every Linear/Conv)
    epochs: int
    batch_size: int
    after_step: List[Callable[[], None]] = field(default_factory=list)
    description: Dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0  # first steps that run forward only (thresholds adapt, weights do not)
    augment: Optional[str] = None  # the recipe's training augmentation (hebbloss.data.augment), e.g. "hflip"
    zca: Optional[Dict[str, Any]] = None  # the recipe's ZCA settings (e.g. hebbloss.zca.MICONI2021), used when zca is on


def _reference_models():
    try:
        from .. import models
    except ImportError:
        return None
    return models


def available_models() -> List[str]:
    """Reference networks of ``hebbloss.models`` that a local rule trains (timm models are named ``timm:NAME``)."""
    models = _reference_models()
    return list(models.with_recipe()) if models is not None else []


DEFAULT_MODEL = "miconi2021"
# The default network is Miconi 2021's with fewer channels, so that `hebbloss run` (train, probe and
# random baseline) finishes in minutes on 2 CPU cores; `--model miconi2021` is the paper's size.
# Without pruning: 99% of 32 x 3 x 3 connections leaves ~3 per filter and some filters none at all.
DEFAULT_MODEL_ARGS = {"channels": [32, 64, 128], "pruning": False}


ZCA_MODELS = {"miconi2021"}  # networks whose paper whitens the input (Miconi 2021)


def default_model() -> str:
    """The network ``hebbloss run`` trains when no --model is given."""
    return DEFAULT_MODEL


def resolve_model(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``cfg`` with ``model`` and ``model_args`` made explicit (the default network when none is given)."""
    cfg = dict(cfg)
    if not cfg.get("model"):
        cfg["model"] = DEFAULT_MODEL
        cfg["model_args"] = {**DEFAULT_MODEL_ARGS, **(cfg.get("model_args") or {})}
    if cfg.get("zca") is None:
        cfg["zca"] = cfg["model"] in ZCA_MODELS
    return cfg


def parse_post(spec: Optional[str], channel_dim: int = 1) -> Optional[nn.Module]:
    """``--post``'s value -> the post-signal module for ``attach`` (None = identity); the names are
    :func:`hebbloss.competition.post_signal`'s: identity, relu, kwta[:K[:MU]], softwta[:BETA], triangle[:POWER]."""
    if spec is None:
        return None
    try:
        return post_signal(spec, channel_dim=channel_dim)
    except ValueError as e:
        raise ConfigError(f"--post {e}") from None


def _exact(name: str) -> str:
    """A selection pattern that matches the module called ``name`` and nothing else."""
    return "^" + re.escape(name) + "$"


def _as_rate(value: Any, what: str) -> float:
    """A learning rate read from the settings (YAML may give '1e-3' as text); a ConfigError if it is no number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None


def _learning_rates(names, lr, cfg: Mapping[str, Any]) -> Dict[str, float]:
    """``hebbloss.optim.learning_rates`` with the run's ``layer_lr`` patterns (rates read by :func:`_as_rate`);
    a bad rate or pattern is a ConfigError."""
    layer_lr = {pattern: _as_rate(value, f"the layer_lr rate of {pattern!r}")
                for pattern, value in (cfg.get("layer_lr") or {}).items()}
    try:
        return optim.learning_rates(names, lr, layer_lr)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def make_optimizer(kind: str, groups, lr: float) -> torch.optim.Optimizer:
    """A stock torch optimizer over ``groups``."""
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ConfigError(f"--optimizer {kind!r} is not known; use sgd or adam")


def _timm_model(name: str, in_chans: int, image_size, model_args: Mapping[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ConfigError(f"--model timm:{name}: timm has no model called {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": in_chans, **model_args}
    try:
        return timm.create_model(name, **{"img_size": image_size, **kwargs})
    except TypeError:  # models without an img_size argument (convnets)
        try:
            return timm.create_model(name, **kwargs)
        except TypeError as e:
            raise ConfigError(f"--model timm:{name}: bad --model-arg ({e})") from None


def _prune(chosen: Sequence, amount: float, seed: int) -> None:
    """Fixed random masks (hebbloss.prune, on torch.nn.utils.prune) on every chosen layer after the first
    (Miconi 2021); seeded per layer, so a rebuilt model has the same masks."""
    from .. import prune

    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"--prune {amount}: the fraction of connections removed must be in [0, 1)")
    for i, (_, module) in enumerate(list(chosen)[1:], start=1):
        prune.random_connections(module, amount, seed=seed * 1000 + i)


def _post_with_overrides(chosen, spec):
    """attach(post=..., overrides=...) so that Linear outputs use their last dimension as channels."""
    post = parse_post(spec, channel_dim=1)
    overrides = {}
    if isinstance(post, nn.Module) and hasattr(post, "channel_dim"):
        for name, module in chosen:
            channel_dim = layer_types.layer_type_of(module).post_channel_dim
            if channel_dim != 1:
                overrides[_exact(name)] = {"post": parse_post(spec, channel_dim=channel_dim)}
    return post, overrides


def probe_layers(cfg: Mapping[str, Any], default) -> Optional[List[str]]:
    """The layers to probe: ``--probe-layers`` when given, else ``default`` (None: the probe's own default)."""
    chosen = cfg.get("probe_layers") or default
    return list(chosen) if chosen else None


def build_generic(cfg: Mapping[str, Any], model: nn.Module, probe_default: List[str]) -> Built:
    """Any model: one rule for its plastic layers, a post signal, optional pruning, per-layer rates."""
    for key in ("rule", "post", "lr"):
        if isinstance(cfg.get(key), Mapping):
            raise ConfigError(f"{key}: one value per layer applies to reference networks (their recipe) only; give "
                              f"{cfg.get('model')} a single {key}" + (" and per-layer rates with layer_lr" if key == "lr" else ""))
    get = lambda k: cfg.get(k) if cfg.get(k) is not None else GENERIC_DEFAULTS[k]  # noqa: E731
    warmup = _warmup_steps(cfg, 0)
    chosen = select_layers(model, cfg.get("layers"))
    post, overrides = _post_with_overrides(chosen, get("post"))
    rates = _learning_rates([n for n, _ in chosen], float(get("lr")), cfg)
    if cfg.get("prune"):
        _prune(chosen, float(cfg["prune"]), int(cfg.get("seed") or 0))
    plastic = attach(model, rule=get("rule"), post=post, targets=[_exact(n) for n, _ in chosen],
                     overrides=overrides or None, reduction="mean", streaming=bool(cfg.get("streaming")))
    try:
        optimizer = make_optimizer(get("optimizer"), optim.param_groups(plastic, rates), float(get("lr")))
    except Exception:
        plastic.remove()
        raise
    return Built(model, plastic, optimizer, probe_layers(cfg, probe_default), int(get("epochs")),
                 int(get("batch_size")), warmup_steps=warmup,
                 description={"rule": get("rule"), "post": get("post"), "lr": float(get("lr")),
                              "optimizer": get("optimizer"), "plastic_layers": [n for n, _ in chosen]})


def create_model(cfg: Mapping[str, Any], image_shape, dataset_name: str = "") -> tuple:
    """(model, default probe layers, recipe or None) for ``cfg["model"]``; raises ConfigError for unknown names."""
    cfg = resolve_model(cfg)
    name, model_args = str(cfg["model"]), dict(cfg.get("model_args") or {})
    c, h, w = image_shape
    if name.startswith("timm:"):
        model = _timm_model(name[5:], c, (h, w), model_args)
        return model, None, None  # None: the probe takes timm's feature stages (feature_info)
    models = _reference_models()
    known = available_models()
    if models is None or name not in known:
        raise ConfigError(
            f"--model {name!r} is not known; reference networks: {', '.join(known) or 'none installed'}; "
            "or any timm model as timm:NAME (e.g. timm:resnet18)"
        )
    builder = getattr(models, name, None)
    try:
        model = models.create(name, **_reference_kwargs(builder, dataset_name, image_shape, model_args, cfg.get("seed") or 0))
    except TypeError as e:
        raise ConfigError(f"--model {name}: bad --model-arg ({e})") from None
    return model, list(getattr(model, "feature_layers", []) or []), getattr(model, "recipe", None)


def _reference_kwargs(builder, dataset_name: str, image_shape, model_args: Mapping[str, Any], seed: int = 0) -> Dict[str, Any]:
    """``model_args`` plus what the reference network must know of the data (its channels, or which
    dataset variant of the paper), when its builder takes it and the user did not set it."""
    import inspect

    kwargs = dict(model_args)
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return kwargs
    if "in_channels" in params and "in_channels" not in kwargs:
        kwargs["in_channels"] = int(image_shape[0])
    if "seed" in params and "seed" not in kwargs:
        kwargs["seed"] = int(seed)
    if "dataset" in params and "dataset" not in kwargs:
        key = dataset_name.lower().replace("-", "").replace("_", "")
        kwargs["dataset"] = "fashionmnist" if "fashion" in key else "mnist" if "mnist" in key else key
    return kwargs


def _warmup_steps(cfg: Mapping[str, Any], default: int) -> int:
    value = default if cfg.get("warmup_steps") is None else cfg["warmup_steps"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"--warmup-steps {value!r}: the number of steps without a weight update must be an integer >= 0")
    return value


def _per_layer(value: Any, layers: Mapping[str, Any], key: str) -> Dict[str, Any]:
    """``{layer: value}`` for one setting: the same value for every layer, or a ``{layer: value}`` mapping
    (as config.yaml records a recipe's per-layer values) that must name exactly the plastic layers."""
    if not isinstance(value, Mapping):
        return {name: value for name in layers}
    if set(value) != set(layers):
        raise ConfigError(f"{key} gives values for layers {', '.join(map(str, value))} but the plastic layers are "
                          f"{', '.join(layers)}; give one value, or one per plastic layer")
    return dict(value)


def explicit_settings(cfg: Mapping[str, Any], built: Built) -> Dict[str, Any]:
    """``cfg`` with the values the run actually uses written in for those left to the recipe or the
    defaults: batch size, warm-up steps, and the plastic layers' rule, post signal and learning rate
    (one value, or ``{layer: value}`` where a reference network's recipe sets them per layer; a recipe's
    post signals by their description). Building from the result gives the same run."""
    out = dict(cfg, batch_size=built.batch_size, warmup_steps=built.warmup_steps)
    if "recipe" not in built.description:
        out.update({key: built.description[key] for key in ("rule", "post", "lr", "optimizer")})
        return out
    layers = built.description["recipe"]["layers"]
    for key in ("rule", "lr"):
        values = {name: lay[key] for name, lay in layers.items()}
        out[key] = next(iter(values.values())) if len(set(values.values())) == 1 else values
    if cfg.get("post") is None:
        out["post"] = {name: lay["post"] for name, lay in layers.items()}
    return out


def build_reference(cfg: Mapping[str, Any], model: nn.Module, recipe, probe_default: List[str]) -> Built:
    """A reference network trained by its recipe (rules, post signals, per-layer rates, SGD and step hooks),
    with --layers, --rule, --post, --lr and --layer-lr applied on a copy of the recipe."""
    for key, hint in (("prune", "reference networks prune as their paper does (e.g. --model-arg pruning=false)"),
                      ("optimizer", "reference networks train with their recipe's SGD")):
        if cfg.get(key) is not None:
            raise ConfigError(f"--{key} does not apply to --model {cfg.get('model')}: {hint}")
    warmup = _warmup_steps(cfg, recipe.warmup_steps)
    recipe = recipe.copy()
    if cfg.get("layers"):
        keep = {n: lay for n, lay in recipe.layers.items() if any(name_matches(p, n) for p in cfg["layers"])}
        if not keep:
            raise ConfigError(f"--layers {cfg['layers']} matches none of the plastic layers of {recipe.name}: {', '.join(recipe.layers)}")
        recipe.layers = keep
    rules, posts, lrs = (_per_layer(cfg.get(key), recipe.layers, key) for key in ("rule", "post", "lr"))
    base = {n: (lay.lr if lrs[n] is None else _as_rate(lrs[n], f"the learning rate of layer {n}")) for n, lay in recipe.layers.items()}
    rates = _learning_rates(recipe.layers, base, cfg)
    for name, lay in recipe.layers.items():
        if rules[name] is not None:
            lay.rule = str(rules[name])
        if isinstance(cfg.get("post"), Mapping):  # the recipe's own post signals, as config.yaml describes them
            if str(posts[name]) != repr(lay.post):
                raise ConfigError(
                    f"post of layer {name}: the settings say {posts[name]!r} but {recipe.name}'s recipe uses {lay.post!r}; "
                    "a recipe's post signal cannot be rebuilt from its description: leave post unset for the recipe's, "
                    "or give one of identity, relu, kwta:K, softwta:BETA")
        elif posts[name] is not None:
            lay.post = parse_post(posts[name], channel_dim=layer_types.layer_type_of(model.get_submodule(name)).post_channel_dim)
        lay.lr = rates[name]
    plastic = recipe.attach(model, streaming=bool(cfg.get("streaming")))
    try:
        optimizer = recipe.optimizer(plastic)
    except Exception:
        plastic.remove()
        raise
    return Built(model, plastic, optimizer, probe_layers(cfg, probe_default),
                 int(cfg.get("epochs") or recipe.epochs), int(cfg.get("batch_size") or recipe.batch_size),
                 warmup_steps=warmup, augment=recipe.augment, zca=recipe.zca,
                 description={"recipe": recipe.to_dict(), "plastic_layers": list(recipe.layers)})
