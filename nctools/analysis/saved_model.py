"""NC metrics of a saved network on a split of a data set: the ``nctools measure`` command.

Usage::

    from nctools.analysis.saved_model import measure_checkpoint
    metrics = measure_checkpoint("resnet18", "resnet18_cifar10.pt", "cifar10", split="test")

The checkpoint is read with ``torch.load(weights_only=True)`` and may be an nctools
``checkpoint.pt`` (then its run's ``config.yaml`` gives the model settings, and the data
settings when the data set is the run's) or a plain state_dict, torchvision ResNet names
included. Features are the input of the last ``nn.Linear`` (or of a named one), taken with
a forward hook; under torchrun every rank takes its rows and the statistics are summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from nctools.errors import CheckpointError, ConfigError, NctoolsError
from nctools.runs.layout import CONFIG_FILE


def _device(name: str):
    from nctools.config.schema import DEVICE_PATTERN
    from nctools.training.steps import resolve_device

    # the rule of train.device, named as the user wrote it (this one skips the loader)
    if not DEVICE_PATTERN.match(name):
        raise ConfigError(f"--device: {name!r} is not auto, cpu, cuda or cuda:N")
    try:
        return resolve_device(name)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("train.device", "--device")) from None


def _override(data_cfg, model_cfg, seed: int, overrides: Sequence[str]):
    """(data, model, seed) settings after ``--set KEY=VALUE`` items, validated as in a run."""
    from dataclasses import asdict

    from nctools.config import typed_yaml
    from nctools.config.schema import Config, config_from_dict, validate

    if isinstance(overrides, str):  # a lone string would be split into characters
        overrides = [overrides]
    merged = asdict(Config(seed=seed, data=data_cfg, model=model_cfg))
    cfg = config_from_dict(merged)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key == PREPROCESS_KEY:
            raise ConfigError(f"--set {item}: {PREPROCESS_KEY} goes with --model")
        if key in ("data.dataset", "model.arch"):
            flag = "--dataset" if key == "data.dataset" else "--arch"
            raise ConfigError(f"--set {item}: give {key} as {flag}")
        if key != "seed" and not key.startswith(("data.", "model.")):
            raise ConfigError(f"--set {item}: measure takes data.*, model.* and seed only")
        source = typed_yaml.apply_override(Config, merged, item)
        cfg = config_from_dict(merged, source)
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"--set: {exc}") from None
    return cfg.data, cfg.model, cfg.seed


def feature_layer(model, name: str | None):
    """The nn.Linear whose input are the features: ``name``, else ``classifier``, else the last."""
    from torch import nn

    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise NctoolsError(f"--layer {name!r}: no such module; nn.Linear layers: {linears}")
        if not isinstance(modules[name], nn.Linear):
            raise NctoolsError(
                f"--layer {name!r} is a {type(modules[name]).__name__}, not an nn.Linear"
            )
        return modules[name]
    if isinstance(getattr(model, "classifier", None), nn.Linear):
        return model.classifier  # nctools networks name their last layer so
    linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
    if not linears:
        raise NctoolsError(f"{type(model).__name__} has no nn.Linear layer to measure")
    return linears[-1]


def hooked_features(model, layer, split, batch_size: int, device, rows: range | None = None,
                    progress: bool = False):
    """Inputs of ``layer`` over a whole split: features (N, D) float32, labels (N,) int64.

    A forward hook, not ``model.features``, so that any Linear can be measured (``--layer``).
    Eval mode, no gradients, the split's order, no augmentation (as in every snapshot).
    ``rows``: only these contiguous rows (a torchrun rank's shard; may be empty).
    ``progress``: a bar over the batches when stderr is a terminal.
    """
    import torch
    from tqdm.auto import tqdm

    from nctools.data.splits import iterate_batches

    rows = range(len(split.labels)) if rows is None else rows
    if len(rows) == 0:
        return torch.zeros(0, layer.in_features), torch.zeros(0, dtype=torch.long)

    captured = []
    handle = layer.register_forward_hook(
        lambda _mod, inputs, _out: captured.append(inputs[0].detach().flatten(1).float().cpu())
    )
    labels = []
    model.eval()
    try:
        with torch.no_grad():
            indices = torch.arange(rows.start, rows.stop)
            batches = tqdm(iterate_batches(split, indices, batch_size), unit="batch",
                           total=-(-len(indices) // batch_size),
                           disable=None if progress else True)  # None: on a terminal only
            for images, y in batches:
                model(images.to(device))
                labels.append(y)
    finally:
        handle.remove()
    return torch.cat(captured), torch.cat(labels).long()


def measure_checkpoint(
    arch: str, checkpoint: str | Path, dataset: str, split: str = "train",
    layer: str | None = None, num_classes: int | None = None, data_root: str | None = None,
    batch_size: int = 256, device: str = "auto", overrides: Sequence[str] = (),
    quiet: bool = True, ood_dataset: str | None = None,
) -> dict[str, float]:
    """METRICS.md metrics of a saved network on ``split`` of ``dataset``.

    The data and network settings are ``dataset``'s and ``arch``'s defaults, or a run's
    (see the module docstring), then ``overrides``: ``KEY=VALUE`` of ``data.*``,
    ``model.*`` and ``seed`` (the subsets' seed), as ``--set`` of ``nctools train``, e.g.
    ``["data.samples_per_class=50", "model.width=16"]``.

    The checkpoint is read only by :func:`nctools.store.load_checkpoint`
    (``torch.load(weights_only=True)``), so it cannot run code. On the test split NC4 and
    ``ncc_accuracy`` use the training class means (METRICS.md, "On other data").
    Under torchrun each rank extracts its own contiguous rows and the statistics are
    summed with all_reduce (:func:`nctools.measure.measure_chunks`); every rank returns
    the metrics of the whole split.

    ``ood_dataset``: a data set name or ``folder:PATH`` whose TEST split, standardised as
    ``dataset`` is (:func:`ood_data`), gives the out-of-distribution features of ``nc5``.
    """
    from nctools.config.schema import DataConfig, ModelConfig, load_config
    from nctools.data.sets import load_dataset
    from nctools.metrics.measure import class_means, measure
    from nctools.models import networks as models
    from nctools.runs import store

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size: must be an int >= 1, got {batch_size!r}")
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int) or num_classes < 2):
        raise ConfigError(f"--num-classes: must be an int >= 2, got {num_classes!r}")
    if arch not in models.ARCHS:
        valid = ", ".join(models.ARCHS)
        raise NctoolsError(f"--arch {arch!r}: unknown architecture; valid names: {valid}")
    state = store.load_checkpoint(Path(checkpoint))
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # an nctools checkpoint.pt
    data_cfg, seed, model_cfg = DataConfig(dataset=dataset), 0, ModelConfig(arch=arch)
    run_config = Path(checkpoint).parent / CONFIG_FILE
    if run_config.is_file():  # a run's checkpoint: its network, and its data if the same set
        saved = load_config(run_config)
        if saved.model.arch == arch:
            model_cfg = saved.model
        if saved.data.dataset.lower() == dataset.lower():
            # the run's subsets and their standardisation: the features it trained on
            data_cfg, seed = replace(saved.data), saved.seed
    if overrides:
        data_cfg, model_cfg, seed = _override(data_cfg, model_cfg, seed, overrides)
    if data_root is not None:
        data_cfg.root = data_root
    try:
        data = load_dataset(data_cfg, seed=seed)
    except ConfigError as exc:  # named as the user wrote it, not as a config key
        raise ConfigError(str(exc).replace("data.dataset", "--dataset")) from None
    if num_classes is not None and num_classes > data.num_classes:
        # a class without samples leaves the metrics undefined: refused before the
        # network (C outputs) is built, whatever its size
        raise ConfigError(f"--num-classes {num_classes}: more than the {data.num_classes} "
                          f"classes of --dataset {dataset}; every class needs samples")
    classes = data.num_classes if num_classes is None else num_classes
    model = models.build_model(model_cfg, classes, data.in_channels, data.image_size)
    try:
        models.load_state_dict_compat(model, state)
    except CheckpointError as exc:
        hint = _stem_hint(state, model)
        if hint:
            raise CheckpointError(f"{checkpoint} does not fit {arch}: {hint}") from None
        raise CheckpointError(f"{checkpoint} does not fit {arch} with {classes} classes "
                              f"and {data.in_channels} input channels: {exc}") from None
    from nctools.training.distributed import dist_from_env, process_group, rank_device

    info = dist_from_env()
    dev = rank_device(_device(device), info, key="--device")
    model.to(dev)
    linear = feature_layer(model, layer)
    weight, bias = linear.weight.detach().cpu(), None
    if linear.bias is not None:
        bias = linear.bias.detach().cpu()
    ood = None
    if ood_dataset is not None:
        ood = ood_data(ood_dataset, data_cfg, seed, data)
    if info.distributed:
        with process_group(info, dev):
            return _measure_shards(model, linear, data, split, batch_size, dev, info,
                                   weight, bias, checkpoint, ood)
    features, labels = hooked_features(model, linear, getattr(data, split), batch_size, dev,
                                       progress=not quiet)
    ood_features = None
    if ood is not None:
        ood_features, _ = hooked_features(model, linear, ood.test, batch_size, dev,
                                          progress=not quiet)
    means = None
    if split == "test":
        train_features, train_labels = hooked_features(model, linear, data.train, batch_size, dev,
                                                       progress=not quiet)
        means = class_means(train_features, train_labels, weight.shape[0])
    try:
        return measure(features, labels, weight, bias, num_classes=weight.shape[0],
                       class_means=means, ood_features=ood_features)
    except ValueError as exc:  # e.g. labels beyond --num-classes
        raise NctoolsError(f"measure --checkpoint {checkpoint}: {exc}") from None


def _stem_hint(state, model) -> str:
    """Which stem (``model.stem``) the checkpoint was trained with, when the model's differs."""
    if not any(hasattr(model, name) for name in ("conv1", "features")):
        return ""
    from nctools.models.torchvision_nets import stem_hint

    return stem_hint({k.removeprefix("module."): v for k, v in state.items()}, model)


def _measure_shards(model, linear, data, split: str, batch_size: int, dev, info,
                    weight, bias, checkpoint, ood=None) -> dict[str, float]:
    """:func:`measure_checkpoint` on this rank's rows, statistics summed over the ranks."""
    import torch

    from nctools.metrics.measure import measure_chunks
    from nctools.metrics.stats import ClassStats
    from nctools.training.distributed import shard_rows

    def shard(name: str, source=data):
        part = getattr(source, name)
        return hooked_features(model, linear, part, batch_size, dev,
                               shard_rows(len(part.labels), batch_size, info))

    num_classes = weight.shape[0]
    features, labels = shard(split)
    try:
        means = None
        if split == "test":  # counts and sums only: the train class means, in one pass
            train_features, train_labels = shard("train")
            dim = train_features.shape[1]
            stats = ClassStats(num_classes, dim, basis=torch.zeros(dim, 0), device=dev)
            stats.update(train_features, train_labels).all_reduce()
            stats.check_nonempty()
            means = stats.class_means()
        ood_features = None if ood is None else shard("test", ood)[0]
        result, _ = measure_chunks(lambda: [(features, labels)], weight, bias, num_classes,
                                   class_means=means, device=dev, ood_features=ood_features,
                                   group=torch.distributed.group.WORLD)
        return result
    except ValueError as exc:
        raise NctoolsError(f"measure --checkpoint {checkpoint}: {exc}") from None


# ------------------------------------------------------------- any network, any layer
FOLDER_PREFIX = "folder:"
# measure --model only: "model" (the network's own evaluation transform; the default for
# timm, torchvision and hf networks) or "nctools" (nctools' standardisation; the default
# for a user's own network)
PREPROCESS_KEY = "data.preprocess"
PREPROCESS = ("model", "nctools")


class _Batches:
    """A re-iterable of one split's batches in order (``measure_model`` reads it twice)."""

    def __init__(self, split, batch_size: int, rows: range | None = None) -> None:
        import torch

        self.split, self.batch_size = split, batch_size
        rows = range(len(split.labels)) if rows is None else rows
        self.indices = torch.arange(rows.start, rows.stop)

    def __iter__(self):
        from nctools.data.splits import iterate_batches

        return iterate_batches(self.split, self.indices, self.batch_size)


def parse_layers(text: str | None) -> list[str] | str | None:
    """``--layers a,b,c`` -> ["a", "b", "c"]; ``blocks`` stays the word; None stays None."""
    if text is None or text.strip() == "blocks":
        return None if text is None else "blocks"
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"--layers {text!r}: give module names separated by commas, or blocks")
    return names


def split_preprocess(overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """(``data.preprocess`` of ``overrides``, None if not given; the other overrides)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    choice, rest = None, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() != PREPROCESS_KEY:
            rest.append(item)
            continue
        choice = value.strip()
        if choice not in PREPROCESS:
            raise ConfigError(f"--set {item}: {PREPROCESS_KEY} must be one of "
                              f"{', '.join(PREPROCESS)}")
    return choice, rest


def ood_data(name: str, data_cfg, seed: int, data, transform=None, flag: str = "--ood-dataset"):
    """The out-of-distribution set ``name`` prepared as the in-distribution ``data`` is.

    Only its TEST split is measured (the held-out images; for ``folder:PATH`` PATH/val or
    PATH/test, else PATH itself). Its settings are ``data_cfg``'s (root, download, pad_to,
    the synthetic shape keys) without the class subsets, and its seed is ``seed + 1``, so
    that ``synthetic`` draws other class centres than a synthetic ``data``.

    ``transform``: the network's own evaluation transform (``--model``): the OOD images go
    through it as ``data``'s do. None: nctools' preprocessing, standardised with ``data``'s
    training mean and std, and the same channels and size are required. Raises ConfigError
    naming ``flag`` for an unknown name or images the network does not take.
    """
    from nctools.data import model_inputs
    from nctools.data.sets import load_dataset, standardise_splits
    from nctools.models import zoo

    if name.startswith(FOLDER_PREFIX):
        if transform is None:  # the in-distribution pixels: size, channels, mean/std
            transform = (zoo.imagenet_eval_transform() if data.channel_mean is None
                         else model_inputs.standardised_like(data))
        ood = model_inputs.image_folder(name[len(FOLDER_PREFIX):], transform, flag=flag)
    else:
        cfg = replace(data_cfg, dataset=name, samples_per_class=None,
                      test_samples_per_class=None)
        try:  # raw pixels: prepared below as the in-distribution set's
            ood = load_dataset(cfg, seed=seed + 1, standardise=data.channel_mean is None
                               and transform is None)
        except ConfigError as exc:
            text = str(exc).replace("data.dataset", flag)
            raise ConfigError(text if text.startswith(flag) else f"{flag} {name}: {text}") from None
        if transform is not None:
            ood = model_inputs.through_transform(ood, transform, flag=flag)
    _check_fits(ood, data, name, flag)
    if not name.startswith(FOLDER_PREFIX) and transform is None and data.channel_mean is not None:
        standardise_splits(ood, data.channel_mean, data.channel_std)
    return ood


def _check_fits(ood, data, name: str, flag: str) -> None:
    """The out-of-distribution images have the channels and size of the network's input."""
    if (ood.in_channels, ood.image_size) != (data.in_channels, data.image_size):
        raise ConfigError(
            f"{flag} {name}: images of {ood.in_channels} channel(s), {ood.image_size} px, but "
            f"the network takes {data.name}'s {data.in_channels} channel(s), "
            f"{data.image_size} px"
            + ("; --set data.pad_to=N pads both sets" if ood.image_size < data.image_size
               else "")
        )


def measure_network(
    spec: str, dataset: str, weights: str | Path | None = None, split: str = "train",
    layers: Sequence[str] | str | None = None, num_classes: int | None = None,
    data_root: str | None = None, batch_size: int = 256, device: str = "auto",
    overrides: Sequence[str] = (), pool: str = "avg", ood_dataset: str | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of a zoo or user network (``--model SPEC``) at ``layers`` on ``split``.

    ``spec`` and ``weights`` as in :mod:`nctools.models.zoo`. ``dataset`` is a data set
    name or ``folder:PATH`` (an ImageFolder). Both are read through the network's own
    evaluation transform (:func:`nctools.models.zoo.eval_transform`; 1-channel sets
    repeated to 3 channels) for timm, torchvision and hf networks, and through nctools'
    standardisation for a user's network; ``data.preprocess=model|nctools`` among
    ``overrides`` chooses (a folder always takes the network's transform). The other
    overrides as for ``--arch`` (e.g. ``data.samples_per_class``).
    Layers as in :func:`nctools.analysis.model_measure.measure_model`; on the test split
    the nearest-class-centre rule uses the training class means (METRICS.md, "On other
    data"). ``ood_dataset``: adds ``nc5`` at the classifier's input, from the test split
    of that set prepared as ``dataset`` is (:func:`ood_data`). Under torchrun each rank
    measures its contiguous rows and every rank gets the union's metrics.
    """
    from nctools.analysis.model_measure import measure_model
    from nctools.config.schema import DataConfig, ModelConfig
    from nctools.data import model_inputs
    from nctools.data.sets import load_dataset
    from nctools.models import zoo
    from nctools.training import distributed

    given, overrides = split_preprocess(overrides)
    own = spec.partition(":")[0] in zoo.ZOOS  # a zoo network has its own transform
    preprocess = given or ("model" if own else "nctools")
    folder = dataset.startswith(FOLDER_PREFIX)
    transform = None
    data_cfg, seed = DataConfig(dataset=dataset), 0
    if data_root is not None:  # where an --ood-dataset is looked for too
        data_cfg.root = data_root
    if folder:  # the network first: its transform decides the pixels
        if given == "nctools":
            raise ConfigError(f"--set {PREPROCESS_KEY}=nctools: a folder:PATH data set is "
                              "read through the network's own transform")
        if num_classes is None:
            raise ConfigError("--num-classes: needed with --dataset folder:PATH")
        model = zoo.build_from_spec(spec, num_classes, model_inputs.MODEL_CHANNELS)
        transform = zoo.eval_transform(model, spec)
        data = model_inputs.image_folder(dataset[len(FOLDER_PREFIX):], transform)
    else:
        if overrides:
            data_cfg, _, seed = _override(data_cfg, ModelConfig(), seed, overrides)
            if data_root is not None:
                data_cfg.root = data_root
        try:
            data = load_dataset(data_cfg, seed=seed, standardise=preprocess == "nctools")
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("data.dataset", "--dataset")) from None
        if preprocess == "model":  # raw pixels through the network's own transform
            model = zoo.build_from_spec(spec, num_classes or data.num_classes,
                                        model_inputs.MODEL_CHANNELS)
            transform = zoo.eval_transform(model, spec)
            data = model_inputs.through_transform(data, transform)
        else:
            model = zoo.build_from_spec(spec, num_classes or data.num_classes,
                                        data.in_channels)
    ood = None
    if ood_dataset is not None:
        ood = ood_data(ood_dataset, data_cfg, seed, data, transform)
    if weights is not None:
        try:
            zoo.load_weights(model, weights)
        except CheckpointError as exc:
            if transform is None:
                raise
            raise CheckpointError(
                f"{exc} (the network was built for its own preprocessing, with 3 input "
                f"channels; --set {PREPROCESS_KEY}=nctools builds it for the data set's "
                "channels and standardisation)") from None
    info = distributed.dist_from_env()
    dev = distributed.rank_device(_device(device), info, key="--device")
    model.to(dev)

    def batches(part) -> _Batches:  # this rank's rows of a split
        rows = distributed.shard_rows(len(part.labels), batch_size, info)
        return _Batches(part, batch_size, rows if info.distributed else None)

    # on the test split NC4's centres are the training class means (METRICS.md)
    reference = batches(data.train) if split == "test" else None
    try:
        with distributed.process_group(info, dev):
            return measure_model(model, batches(getattr(data, split)), layers=layers,
                                 pool=pool, device=dev, progress=True, reference=reference,
                                 ood=None if ood is None else batches(ood.test))
    except ValueError as exc:
        if str(exc).startswith("ood"):
            raise NctoolsError(f"--ood-dataset {ood_dataset}: {exc}") from None
        raise NctoolsError(f"measure --model {spec}: {exc}") from None
    except RuntimeError as exc:  # the network refuses the images (channels, size)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NctoolsError(
            f"measure --model {spec}: the network fails on {dataset}'s images of "
            f"{data.in_channels} channel(s), {data.image_size} px: {first}"
        ) from None
