"""Typed job configuration: dataclasses, YAML files, dotted ``key=value`` overrides.

Every problem (unknown key, wrong type, value out of range) raises ``ConfigError`` with one line that names
the key and the fix, before anything heavy (data, model, processes) starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from vaejob import storage
from vaejob.cli import UserError

MAX_IMAGE_SIZE = 8192  # as vaejob.shard --size


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message is one line for the user."""


@dataclass
class DataConfig:
    shards: str = "shards/fashion-mnist"  # shard-set dir (or URL) with manifest.json
    num_workers: int | Literal["auto"] = "auto"  # loader worker processes per rank (auto: vaejob.device)
    shuffle_buffer: int = 2000
    verify: bool = False  # sha256 every shard before training (slow on big sets)
    # The images the model sees: image_size x image_size (0 = the shard set's own size; required for
    # indexed sets whose images have many sizes), brought there by resize; channels 1 (grey) or 3 (RGB),
    # 0 = the set's own.
    image_size: int = 0
    resize: Literal["center_crop", "resize", "pad"] = "center_crop"
    channels: int = 0
    # Bernoulli-binarised pixels (vaejob.loader.binarize), for loss.likelihood=bernoulli only: none = grey
    # levels (BCE with soft targets: no likelihood); static = one fixed draw per image; dynamic = a fresh
    # draw per image every epoch. Evaluation of a binarised run reads the static draw.
    binarize: Literal["none", "static", "dynamic"] = "none"
    # Object-store reads and writes (data.shards / samples.root URLs): retries of a failed request, waiting
    # io_backoff_s * 2**k before retry k (defaults: 5 retries over 31 s), then the job fails with one line.
    io_retries: int = 5
    io_backoff_s: float = 1.0

    def target(self) -> dict[str, Any]:
        """The keyword arguments of ``open_shards`` that set the loader's image shape."""
        return {"image_size": self.image_size, "channels": self.channels, "resize": self.resize}


@dataclass
class ModelConfig:
    name: Literal["conv", "mlp", "resnet", "hvae"] = "conv"  # vaejob.models
    latent_dim: int = 16  # conv, mlp, resnet with a dense latent
    # conv: one stride-2 block each; resnet, hvae: one stage per resolution, full size first, each halved
    channels: list[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 3  # conv
    hidden_dim: int = 0  # conv: dense bottleneck before (mu, logvar); 0 = heads read the features
    hidden_sizes: list[int] = field(default_factory=lambda: [400])  # mlp
    activation: Literal["relu", "leaky_relu", "silu", "gelu", "elu"] = "relu"  # conv, mlp
    norm: Literal["none", "batch", "group"] = "none"  # conv
    blocks: int = 1  # resnet: residual blocks per stage (decoder: one more); hvae: residual cells per stage
    attention: bool = False  # resnet: self-attention in the mid blocks at the lowest resolution
    # resnet: > 0 = a spatial latent with these channels at the lowest resolution (SD's), 0 = dense latent_dim;
    # hvae: channels of each latent group
    latent_channels: int = 0
    groups: list[int] = field(default_factory=list)  # hvae: latent groups per stage (as model.channels)
    # hvae: log sigma of q and p soft-bounded to [-b, b] by b tanh(x / b) (NVAE: 5); 0 = unbounded (VDVAE)
    log_scale_bound: float = 5.0


@dataclass
class LossConfig:
    # bernoulli: BCE (the notebooks'); gaussian: fixed σ, reported discretized; discretized_*: over 256 levels
    likelihood: Literal["bernoulli", "gaussian", "discretized_gaussian", "discretized_logistic_mixture"] = (
        "bernoulli"
    )
    gaussian_std: float = 0.1  # fixed decoder std for the gaussian likelihood (pixels in [0,1])
    scale: Literal["channel", "pixel"] = (
        "channel"  # discretized_gaussian: a learned scale per channel or pixel
    )
    mixtures: int = 10  # discretized_logistic_mixture: components per pixel (PixelCNN++ and NVAE use 10)
    beta: float = 1.0
    beta_warmup_steps: int = 0  # beta ramps linearly from 0 over these steps
    free_bits: float = 0.0  # nats per latent dim below which KL is not penalised (Kingma et al. 2016)
    iw_samples: int = 1  # > 1: train on the IWAE bound with this many posterior samples (Burda et al. 2016)
    spectral_reg: float = 0.0  # NVAE's spectral regularisation coefficient (vaejob.models.spectral); 0 = off


@dataclass
class TrainConfig:
    batch_size: int = 128  # per process
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "auto"  # auto: vaejob.device
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = (
        False  # torch.compile mode; true = default
    )
    channels_last: bool = False
    num_threads: int = 0  # torch intra-op threads per process; 0 = leave the default
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    sample_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 100  # with on_nonfinite=skip, stop after this many non-finite steps
    # VDVAE: an update whose gradient norm (before clipping) exceeds this is skipped; 0 = off
    skip_threshold: float = 0.0
    max_consecutive_skips: int = 10  # more skipped updates in a row (either reason) stop the job: it diverged
    deterministic: bool = False  # torch.use_deterministic_algorithms (CPU runs are deterministic anyway)
    progress: bool = True  # tqdm bar on rank 0
    # Evaluation, samples and the checkpoint's ema.safetensors use an exponential moving average of the
    # weights with this decay (0 = off; vaejob.ema has the warm-up).
    ema_decay: float = 0.0
    fid_every: int = 0  # FID (and KID) of the weights every this many steps, see the fid section; 0 = off


@dataclass
class FidConfig:
    samples: int = 2000  # generated images per FID during training (vaejob.evaluate --fid N sets its own)
    real: int = 0  # real val images compared (0 = all of them); their statistics are cached
    network: Literal["pytorch-fid", "fid-helper"] = "pytorch-fid"  # where the Inception weights come from
    weights: str = ""  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth on a cluster without internet
    cache: str = ""  # real-image statistics; "" = ~/.cache/vaejob/fid
    batch_size: int = 64


@dataclass
class SamplesConfig:
    num: int = 64  # generated images per grid
    seed: int = 1234  # fixed z, so grids are comparable across steps
    recon: int = 16  # fixed val images shown over their reconstructions
    root: str = ""  # where samples/ and plots/ go: a local path or fsspec URL; "" = run.dir
    final_plots: bool = True


@dataclass
class RunConfig:
    dir: str = "runs/fashion_mnist"
    resume: str = "auto"  # auto | never | PATH to a checkpoint dir
    # A rank that waits this long in a collective (all-reduce, barrier) fails the job instead of hanging:
    # a hung or lost peer ends the job in minutes, not torch's 30. Long enough for rank 0's slowest solo
    # work between two collectives (writing a checkpoint of a big model to slow shared storage).
    collective_timeout_s: float = 600.0
    # A run-dir lease whose heartbeat is older than this belongs to a dead job and is taken over.
    lease_timeout_s: float = 120.0


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "vaejob"
    entity: str = ""
    group: str = ""
    job_type: str = "train"
    name: str = ""
    tags: list[str] = field(default_factory=list)
    log_images: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):  # YAML 1.1 reads a bare `no` as False
            value = "no"
        if value not in typing.get_args(tp):
            choices = "|".join(str(a) for a in typing.get_args(tp))
            raise ConfigError(f"config key '{key}' is {value!r}; use one of {choices}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, e.g. {key}=[1,2], got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        expected = " or ".join(_expected(arg) for arg in typing.get_args(tp))
        raise ConfigError(f"config key '{key}' must be {expected}, got {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}' must be null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool | list | dict) or value is None:
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")


def _expected(tp: Any) -> str:
    """What a value of annotation ``tp`` looks like, for error lines."""
    if typing.get_origin(tp) is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(tp, str(tp))


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{dotted}' must be a mapping, got {value!r}")
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` -> ("train.lr", 0.0003); values are parsed as YAML scalars/lists."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{text}' is not key=value (e.g. train.max_steps=1000)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:
            value = float(value)  # PyYAML reads 3e-4 (no dot) as a string
        except ValueError:
            pass
    return key.strip(), value


def validate(cfg: Config) -> None:
    t, m = cfg.train, cfg.model
    positive = {
        "train.batch_size": t.batch_size,
        "train.max_steps": t.max_steps,
        "train.log_every": t.log_every,
        "train.eval_every": t.eval_every,
        "train.checkpoint_every": t.checkpoint_every,
        "train.sample_every": t.sample_every,
        "train.keep_checkpoints": t.keep_checkpoints,
        "model.latent_dim": m.latent_dim,
        "model.kernel_size": m.kernel_size,
        "loss.mixtures": cfg.loss.mixtures,
        "fid.samples": cfg.fid.samples,
        "fid.batch_size": cfg.fid.batch_size,
        "samples.num": cfg.samples.num,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    if not t.lr > 0:
        raise ConfigError(f"config key 'train.lr' must be > 0, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"config key 'train.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio}")
    if t.warmup_steps < 0 or t.grad_clip < 0 or t.num_threads < 0 or t.weight_decay < 0:
        raise ConfigError("config keys train.warmup_steps/grad_clip/num_threads/weight_decay must be >= 0")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"config key 'train.adam_betas' must be two numbers in [0, 1), got {t.adam_betas}")
    if m.name == "conv" and not 1 <= len(m.channels) <= 5:
        raise ConfigError(f"config key 'model.channels' needs 1 to 5 conv blocks, got {m.channels}")
    if m.name == "conv" and m.kernel_size % 2 == 0:
        raise ConfigError(f"config key 'model.kernel_size' must be odd, got {m.kernel_size}")
    if any(c <= 0 for c in m.channels + m.hidden_sizes) or m.hidden_dim < 0:
        raise ConfigError("config keys model.channels/hidden_sizes/hidden_dim must be positive")
    _validate_stages(m)
    if cfg.loss.beta < 0 or cfg.loss.free_bits < 0 or cfg.loss.beta_warmup_steps < 0:
        raise ConfigError("config keys loss.beta/free_bits/beta_warmup_steps must be >= 0")
    if cfg.loss.iw_samples < 1:
        raise ConfigError(
            f"config key 'loss.iw_samples' must be >= 1 (1 = the ELBO), got {cfg.loss.iw_samples}"
        )
    if cfg.loss.iw_samples > 1 and cfg.loss.free_bits > 0:
        raise ConfigError(
            "config key 'loss.free_bits' applies to the ELBO only; set it to 0 with loss.iw_samples > 1"
        )
    if cfg.loss.spectral_reg < 0:
        raise ConfigError(
            f"config key 'loss.spectral_reg' must be >= 0 (0 = off), got {cfg.loss.spectral_reg}"
        )
    if t.skip_threshold < 0:
        raise ConfigError(f"config key 'train.skip_threshold' must be >= 0 (0 = off), got {t.skip_threshold}")
    if t.max_consecutive_skips < 1:
        raise ConfigError(
            f"config key 'train.max_consecutive_skips' must be >= 1, got {t.max_consecutive_skips}"
        )
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"config key 'train.ema_decay' must be in [0, 1), e.g. 0.999, got {t.ema_decay}")
    if t.fid_every < 0 or cfg.fid.real < 0:
        raise ConfigError("config keys train.fid_every and fid.real must be >= 0 (0 = off / all)")
    if not cfg.loss.gaussian_std > 0:
        raise ConfigError(f"config key 'loss.gaussian_std' must be > 0, got {cfg.loss.gaussian_std}")
    if not 0 <= cfg.data.image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"config key 'data.image_size' must be in [0, {MAX_IMAGE_SIZE}] pixels (0 = the shard set's own), "
            f"got {cfg.data.image_size}"
        )
    if cfg.data.channels not in (0, 1, 3):
        raise ConfigError(
            f"config key 'data.channels' must be 0 (the set's own), 1 or 3, got {cfg.data.channels}"
        )
    if cfg.data.binarize != "none" and cfg.loss.likelihood != "bernoulli":
        raise ConfigError(
            f"config key 'data.binarize' is {cfg.data.binarize!r} but loss.likelihood is "
            f"{cfg.loss.likelihood!r}; binarised images need loss.likelihood=bernoulli (or data.binarize=none)"
        )
    if cfg.data.num_workers != "auto" and cfg.data.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0, got {cfg.data.num_workers}")
    if cfg.data.io_retries < 0 or not cfg.data.io_backoff_s >= 0:
        raise ConfigError("config keys data.io_retries / data.io_backoff_s must be >= 0")
    if "://" in cfg.run.dir and not cfg.run.dir.startswith("file://"):
        raise ConfigError(
            f"config key 'run.dir' is {cfg.run.dir!r}: checkpoints, status and the lease need a local or shared "
            "filesystem path (samples.root may be a URL)"
        )
    if not cfg.data.shards:
        raise ConfigError(
            "config key 'data.shards' is empty; point it at a shard set (python -m vaejob.shard)"
        )
    if not cfg.run.dir:
        raise ConfigError("config key 'run.dir' is empty; give the run a directory")
    for key in ("collective_timeout_s", "lease_timeout_s"):
        if not getattr(cfg.run, key) > 0:
            raise ConfigError(f"config key 'run.{key}' must be > 0 seconds, got {getattr(cfg.run, key)}")


def _validate_stages(m: ModelConfig) -> None:
    """The keys of the staged families (resnet, hvae)."""
    if m.name not in ("resnet", "hvae"):
        return
    if not 1 <= len(m.channels) <= 7:
        raise ConfigError(f"config key 'model.channels' needs 1 to 7 stages for {m.name}, got {m.channels}")
    if m.blocks < (1 if m.name == "resnet" else 0):
        raise ConfigError(
            f"config key 'model.blocks' must be >= {int(m.name == 'resnet')} for {m.name}, got {m.blocks}"
        )
    if m.latent_channels < 0 or not m.log_scale_bound >= 0:
        raise ConfigError("config keys model.latent_channels / model.log_scale_bound must be >= 0")
    if m.name != "hvae":
        return
    if len(m.groups) != len(m.channels) or any(g < 0 for g in m.groups) or sum(m.groups) < 1:
        raise ConfigError(
            f"config key 'model.groups' needs one count >= 0 per stage of model.channels ({len(m.channels)}), "
            f"at least one group in all, e.g. model.groups=[0,2]; got {m.groups}"
        )
    if m.latent_channels < 1:
        raise ConfigError(
            "config key 'model.latent_channels' must be >= 1 for hvae (channels per latent group)"
        )


def prepare_storage(cfg: Config, locations: dict[str, str]) -> None:
    """Before a job touches object storage: its retry policy (``data.io_*``) for every later request, and one
    line for a missing bucket, wrong credentials or an unreachable endpoint of each ``{what: url}``."""
    storage.configure(retries=cfg.data.io_retries, backoff_s=cfg.data.io_backoff_s)
    for what, url in locations.items():
        if url:
            storage.check_access(url, what)


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, then type and range checks."""
    tree: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' not found; pick one from configs/ or pass a path")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise ConfigError(f"config file '{path}'{where} is not valid YAML; fix the syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file '{path}' must be a mapping of sections (data:, model:, train:, ...)"
            )
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg
