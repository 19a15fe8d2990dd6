"""``nctools measure``: the NC metrics of a saved network on a split of a data set.

Two ways to name the network, one measurement: both end in
:func:`nctools.analysis.model_measure.measure_model`.

- ``--arch A --checkpoint FILE``: an nctools network (built through
  :mod:`nctools.models.registry`) and an nctools ``checkpoint.pt`` or a plain state_dict
  (torchvision ResNet names included), read with ``torch.load(weights_only=True)``. A run's
  checkpoint is rebuilt with its run's ``config.yaml`` (and its data settings when the data
  set is the run's). Prints the metrics of the input of the last ``nn.Linear`` (or
  ``--layer``): a text table or ``--json``.
- ``--model SPEC [--weights FILE]``: any network of the registry (``timm:``,
  ``torchvision:``, ``hf:``, ``package.module:factory``), at ``--layers``: one row per layer.

On the test split the nearest-class-centre rule uses the training class means
(``reference=``); ``--ood-dataset`` adds nc5 (``ood=``); under torchrun every rank measures
its contiguous rows and the statistics are summed (``group=``).

``--model hf:PATH`` of a language model (``*ForCausalLM``, ``*ForMaskedLM``) with
``--dataset text:FILE`` measures its tokens over the vocabulary: :mod:`measure_text`.
"""

from __future__ import annotations

import argparse
import json
import math

from nctools.cli import measure_text
from nctools.cli.common import add_command, add_overrides
from nctools.errors import NctoolsError

IMAGE_BATCH = 256  # --batch-size of the classification way


def add_parser(sub) -> None:
    p = add_command(
        sub, "measure", "NC metrics of a saved classifier on a data set split",
        "nctools measure --arch resnet18 --checkpoint runs/c10/checkpoint.pt "
        "--dataset cifar10 --split test --json",
        "nctools measure --arch convnet --checkpoint model.pt --dataset mnist5k "
        "--set model.width=16 --set data.samples_per_class=50",
        "nctools measure --model timm:resnet18 --weights ft.safetensors "
        "--dataset folder:~/imgs --layers blocks --csv",
        "nctools measure --model timm:resnet18 --weights ft.safetensors --dataset cifar10 "
        "--split test --ood-dataset svhn",
        "nctools measure --model hf:./gpt2 --dataset text:corpus.txt --seq-len 512 "
        "--min-count 10 --cdnv-power 2 --global-mean classes",
        "nctools measure --model hf:./gpt2 --dataset text:corpus.txt --layers blocks --csv "
        "--plot depth.png",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help="an nctools network architecture, e.g. resnet18")
    which.add_argument("--model", metavar="SPEC",
                       help="timm:NAME, torchvision:NAME, hf:PATH or package.module:factory")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="with --arch: nctools checkpoint.pt or a plain state_dict")
    p.add_argument("--weights", metavar="FILE",
                   help="with --model: state_dict .pt, .safetensors or Lightning checkpoint")
    p.add_argument("--layers", metavar="A,B,C",
                   help="with --model: module names, or 'blocks' (every top-level block); "
                        "default: the input of the last nn.Linear")  # fmt: skip
    p.add_argument("--csv", action="store_true", help="with --model: print one CSV row per layer")
    p.add_argument("--plot", metavar="FILE",
                   help="with --layers: also draw the metrics against depth to FILE "
                        "(.png, .pdf or .svg)")  # fmt: skip
    p.add_argument("--dataset", required=True,
                   help="data set name, e.g. cifar10, or folder:PATH (an ImageFolder)")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--ood-dataset", metavar="NAME",
                   help="adds nc5: the test split of this data set (a name or folder:PATH), "
                        "prepared as --dataset is, as out-of-distribution data")  # fmt: skip
    p.add_argument("--layer", metavar="NAME",
                   help="the nn.Linear whose input are the features (default: the last one)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--num-classes", type=int, metavar="C",
                   help="classes of the network (default: the data set's)")
    p.add_argument("--data-root", metavar="DIR", help="where torchvision data sets live")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="images a batch (default 256), or sequences for a language model (8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_overrides(p, "a data.*, model.* or seed setting (repeatable), e.g. "
                     "data.samples_per_class=50 or model.width=16; with --model, "
                     "data.preprocess=model|nctools: the network's own evaluation "
                     "transform (default for timm/torchvision/hf) or nctools' "
                     "standardisation")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar over the batches")
    measure_text.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from nctools.cli import measure_arch, measure_spec
    from nctools.training.distributed import dist_from_env

    _check_flags(args)
    task = measure_text.lm_task_of(args)
    if task is not None:  # a language model: its token samples over the vocabulary
        layers = measure_text.measure(args, task)
        if dist_from_env().is_main:
            if args.layers:
                where = {"model": args.model, "dataset": args.dataset}
                print(format_layers(layers, _style(args), where))
                _plot(args, layers, "text")
            else:
                (result,) = layers.values()  # the LM head's input
                as_csv = format_layers(layers, "csv")
                print(as_csv if args.csv else format_metrics(result, as_json=args.json))
        return 0
    args.batch_size = args.batch_size or IMAGE_BATCH
    if args.model is not None:
        layers = measure_spec.measure(args)
        if dist_from_env().is_main:  # every rank holds the result; rank 0 prints it
            where = {"model": args.model, "dataset": args.dataset, "split": args.split}
            print(format_layers(layers, _style(args), where))
            _plot(args, layers, args.split)
        return 0
    result = measure_arch.measure(args)
    if dist_from_env().is_main:
        print(format_metrics(result, as_json=args.json))
    return 0


def _style(args: argparse.Namespace) -> str:
    return "json" if args.json else "csv" if args.csv else "table"


def _plot(args: argparse.Namespace, layers: dict[str, dict[str, float]], split: str) -> None:
    """``--plot``: the layers' metrics against depth, written atomically."""
    import sys

    from nctools.analysis.layer_plots import measure_table, plot_layers

    if args.plot is None:
        return
    if len(layers) < 2:
        _one_layer(args.layers)
    title = f"{args.model} on {args.dataset}" + ("" if split == "text" else f" ({split})")
    out = plot_layers(measure_table(layers, split), args.plot, title=title)
    print(f"wrote {out}", file=sys.stderr)


def _one_layer(layers: str) -> None:
    raise NctoolsError(f"--plot: draws metrics against depth and --layers {layers} is one "
                       "layer; give several (--layers blocks)")


def _check_flags(args: argparse.Namespace) -> None:
    """The flags of the other way of naming a network, and values argparse lets through."""
    if args.plot is not None:
        from nctools.analysis.plots import figure_format

        figure_format(args.plot)  # an unknown extension fails before the measurement
        if not args.layers:
            raise NctoolsError("--plot needs --layers (e.g. --layers blocks): it draws the "
                               "metrics against depth")
        if "," not in args.layers and args.layers not in ("blocks", "all"):
            _one_layer(args.layers)
    if args.batch_size is not None and args.batch_size < 1:
        raise NctoolsError(f"--batch-size: must be an int >= 1, got {args.batch_size!r}")
    if args.num_classes is not None and args.num_classes < 2:
        raise NctoolsError(f"--num-classes: must be an int >= 2, got {args.num_classes!r}")
    if args.model is not None:
        if args.checkpoint is not None:
            raise NctoolsError("--checkpoint goes with --arch; give --model's weights as "
                               "--weights")
        if args.json and args.csv:
            raise NctoolsError("--json and --csv: choose one")
        return
    for flag in ("weights", "layers", "csv"):
        if getattr(args, flag):
            raise NctoolsError(f"--{flag} goes with --model, not --arch")
    if args.checkpoint is None:
        raise NctoolsError("--arch needs --checkpoint FILE")


def format_metrics(result: dict[str, float], as_json: bool) -> str:
    """One network's metrics: ``key  value`` lines, or JSON (strict: NaN is null)."""
    if as_json:
        plain = {k: (v if math.isfinite(v) else None) for k, v in result.items()}
        return json.dumps(plain, indent=2, allow_nan=False)
    width = max(len(k) for k in result)
    return "\n".join(f"{k:<{width}}  {v:.6g}" for k, v in result.items())


def format_layers(result: dict[str, dict[str, float]], style: str,
                  where: dict[str, str] | None = None) -> str:
    """One row per layer: ``json``, ``csv`` (exact values) or an aligned ``table``; a csv
    row starts with ``where``'s columns (model, dataset, split), so that the rows of
    several commands can be concatenated into one table."""
    if style == "json":
        return json.dumps(result, indent=2)
    rows = sorted(result.values(), key=len, reverse=True)  # the full suite's order first
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if style == "csv":
        where = where or {}
        first = [_csv_cell(v) for v in where.values()]
        lines = [",".join([*where, "layer", *columns])]
        lines += [",".join([*first, _csv_cell(layer),
                            *(repr(row[k]) if k in row else "" for k in columns)])
                  for layer, row in result.items()]
        return "\n".join(lines)
    width = max(len("layer"), *(len(layer) for layer in result))
    cells = [[f"{row[k]:.4g}" if k in row else "-" for k in columns] for row in result.values()]
    sizes = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(columns)]
    lines = []
    for name, line in [("layer", columns), *zip(result, cells, strict=True)]:
        padded = (f"{c:>{n}}" for c, n in zip(line, sizes, strict=True))
        lines.append("  ".join([f"{name:<{width}}", *padded]))
    return "\n".join(lines)


def _csv_cell(text: str) -> str:
    """A CSV field: quoted when it holds a comma, quote or newline (RFC 4180)."""
    if any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text
