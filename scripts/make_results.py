"""Regenerate results/mnist5k-convnet/ (the packaged demo config, trained, analysed,
plotted) or, with ``--layers blocks``, results/layerwise-demo/ (the same run with every
top-level block's features in each snapshot, drawn against depth).

Usage::

    python scripts/make_results.py      # run in runs/results-demo, files in results/mnist5k-convnet
    python scripts/make_results.py --run /tmp/demo --results results/mnist5k-convnet
    python scripts/make_results.py --layers blocks  # runs/results-layers -> results/layerwise-demo

Trains ``nctools/configs/demo.yaml`` (mnist5k + convnet) into a fresh run directory
(an existing one of the same config is continued, a finished one is kept), measures
every snapshot, draws the collapse curves, then copies ``metrics.csv``, ``history.csv``,
``run.json`` and ``collapse.png`` into the results folder and writes its README.md:
the command, the hardware, the wall time and the headline numbers. Snapshots stay in
the run directory (they are large and not committed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from machine import cpu_model

from nctools.analysis.layer_plots import FUZZINESS, plot_layers, separation_fit
from nctools.analysis.plots import plot_runs
from nctools.analysis.tables import analyze
from nctools.config.schema import load_config
from nctools.runs.layout import PENULTIMATE
from nctools.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("metrics.csv", "history.csv", "run.json", "config.yaml")


def headline(table: pd.DataFrame, history: pd.DataFrame) -> dict:
    """TPT onset, train NC1 at the onset snapshot and at the last one, final accuracies.

    The onset snapshot is the first snapshot at or after the onset epoch (the onset
    need not be a snapshot epoch).
    """
    nc1 = table[(table["split"] == "train") & (table["metric"] == "nc1")]
    nc1 = nc1.set_index("epoch")["value"].sort_index()
    onset = table["tpt_onset_epoch"].iloc[0]
    last = history.iloc[-1]
    out = {"onset": None if pd.isna(onset) else int(onset), "last_epoch": int(nc1.index[-1]),
           "nc1_last": float(nc1.iloc[-1]), "train_acc": float(last["train_acc"]),
           "test_acc": float(last["test_acc"])}
    if out["onset"] is not None:
        at = nc1[nc1.index >= out["onset"]]
        out["onset_snapshot"] = int(at.index[0])
        out["nc1_onset"] = float(at.iloc[0])
        out["ratio"] = out["nc1_onset"] / out["nc1_last"]
        out["ratios"] = ratios(table, out["onset_snapshot"], out["last_epoch"])
        out["dips"] = accuracy_dips(history, out["onset"])
    return out


def accuracy_dips(history: pd.DataFrame, onset: int) -> dict:
    """After the onset: the lowest eval-mode training accuracy (and its epoch) at the
    epochs where it was measured, and the first epoch from which it never fell again."""
    measured = history[(history["epoch"] > onset) & history["train_acc"].notna()]
    low = measured.loc[measured["train_acc"].idxmin()]
    below = measured[measured["train_acc"] < 1.0]
    after = measured[measured["epoch"] > below["epoch"].max()] if len(below) else measured
    running = history[history["epoch"] > onset]["train_acc_running"]
    return {"min": float(low["train_acc"]), "min_epoch": int(low["epoch"]),
            "dipped": len(below), "measured": len(measured),
            "stable_from": int(after["epoch"].iloc[0]) if len(after) else None,
            "running_min": float(running.min())}


# Keys that mean something only for some data sets or networks (their defaults are
# written into every run's config.yaml; the committed copy leaves out those that do not
# apply to its run).
SYNTHETIC_ONLY = ("num_classes", "train_per_class", "test_per_class", "channels", "image_size")
ARCH_KEYS = {"width": ("convnet",), "depth": ("densenet",), "growth_rate": ("densenet",)}
FIGURE_METRICS = ("nc1", "equinorm_means", "equinorm_weights", "equiangular_means",
                  "equiangular_weights", "maxangle_means", "maxangle_weights", "self_duality",
                  "ncc_mismatch")


def applicable_config(text: str) -> str:
    """A run's config.yaml without the keys that do not apply to its data set and network
    (``load_config`` fills them back with their defaults)."""
    data = yaml.safe_load(text)
    if data["data"]["dataset"] != "synthetic":
        for key in SYNTHETIC_ONLY:
            data["data"].pop(key, None)
    arch = data["model"]["arch"]
    for key, archs in ARCH_KEYS.items():
        if not arch.startswith(archs):
            data["model"].pop(key, None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def ratios(table: pd.DataFrame, start: int, last: int) -> dict[str, float]:
    """Each figure metric (train split) at the onset snapshot over its value at the end."""
    train_rows = table[table["split"] == "train"]
    wide = train_rows.pivot_table(index="epoch", columns="metric", values="value")
    return {m: float(wide.loc[start, m] / wide.loc[last, m]) if wide.loc[last, m] else math.inf
            for m in FIGURE_METRICS}


def layer_epochs(table: pd.DataFrame, history: pd.DataFrame) -> list[int]:
    """The epochs drawn against depth: the first, the onset snapshot, the last before the
    first learning-rate drop and the last."""
    available = sorted(int(e) for e in table["epoch"].unique())
    onset = table["tpt_onset_epoch"].iloc[0]
    picks = [available[0], available[-1]]
    if not pd.isna(onset):
        picks.append(next(e for e in available if e >= int(onset)))
    first_lr = history["lr"].iloc[0]
    before_drop = [e for e in available
                   if history.loc[history["epoch"] == e, "lr"].iloc[0] == first_lr]
    if before_drop:
        picks.append(before_drop[-1])
    return sorted(set(picks))


def layer_readme(text: str, table: pd.DataFrame, epochs: list[int]) -> str:
    """The demo README retitled for the layer-wise run, with the fitted metric per layer
    at ``epochs`` and He & Su's decay ratio per layer (train split)."""
    layers = list(pd.unique(table["layer"]))
    metric = next(m for m in FUZZINESS if m in set(table["metric"]))
    train_rows = table[(table["split"] == "train") & (table["metric"] == metric)]
    wide = train_rows.pivot_table(index="epoch", columns="layer", values="value")[layers]
    depth = np.arange(1, len(layers) + 1, dtype=float)
    lines = [f"| epoch | {' | '.join(layers)} | decay ratio per layer |",
             "|" + "---:|" * (len(layers) + 2)]
    for epoch in epochs:
        values = wide.loc[epoch].to_numpy(dtype=float)
        ratio = separation_fit(depth, values)[2]
        lines.append(f"| {epoch} | " + " | ".join(f"{v:.4g}" for v in values)
                     + f" | {ratio:.3g} |")
    rest = text.split("\n", 1)[1].replace(
        "runs the packaged demo\nconfig (`nctools/configs/demo.yaml`, the same run as "
        "`nctools demo`)", "runs the packaged demo\nconfig (`nctools/configs/demo.yaml`) "
        "with `snapshot.layers: blocks` (the training is `nctools demo`'s)")
    head = "# Layer-wise collapse: the demo with `snapshot.layers: blocks`"
    section = [
        "", "## Layer by layer", "",
        f"Train `{metric}` at each layer (`layer` column of `metrics.csv`; `{PENULTIMATE}` is "
        "the penultimate features, the other layers' outputs are globally average-pooled), "
        "and the decay ratio exp(slope) of the least-squares fit of its log against depth "
        "(He & Su 2023, \"law of data separation\"). `layers.png` draws these epochs.", "",
        *lines, "",
    ]
    rest = rest.replace("- `collapse.png`: the collapse curves (train solid, test dashed, "
                        "dotted line at the onset)",
                        "- `layers.png`: every layer's metrics against depth at the epochs "
                        "of the table (train solid, test dashed)")
    files = rest.index("## Files")
    return head + "\n" + rest[:files] + "\n".join(section) + "\n" + rest[files:]


def load_average() -> str:
    """The 1-minute load average, which says how busy the (shared) machine was."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def readme(cfg_text: str, facts: dict, command: str, seconds: float, cpu: float,
           load: str, device: str, done: int) -> str:
    h = facts
    lines = [
        "# mnist5k + convnet: the nctools demo, trained far past zero training error",
        "",
        f"Made by `{command}` on {date.today().isoformat()}, which runs the packaged demo",
        "config (`nctools/configs/demo.yaml`, the same run as `nctools demo`) through",
        "`nctools.training.loop.train`, `nctools.analysis.tables.analyze` and the plots of",
        "`nctools.analysis`.",
        "",
        "## Hardware",
        "",
        f"- CPU: {cpu_model()}, `nproc` = {os.cpu_count()}"
        f" (torch threads: {torch.get_num_threads()})",
        f"- torch {torch.__version__}, Python {platform.python_version()}, device {device}",
        f"- train + analyze + plot: {seconds / 60:.1f} min wall ({seconds:.0f} s),"
        f" {cpu:.0f} s CPU (user + sys, all threads), on a machine shared with other jobs"
        f" (1-minute load average {load} at start / end)"
        + (f"; the run directory already held {done} epochs, not timed here" if done else ""),
        "",
        "## Headline numbers",
        "",
    ]
    if h["onset"] is None:
        lines.append("- training error never reached zero: no terminal phase")
    else:
        lines += [
            "- onset of the terminal phase (first epoch whose eval-mode training accuracy "
            f"reaches train.tpt_accuracy): "
            f"epoch {h['onset']}; {h['last_epoch'] - h['onset']} epochs of TPT follow "
            f"({(h['last_epoch'] - h['onset']) / h['onset']:.1f} x the onset epoch)",
            "- eval-mode training accuracy after the onset (measured at the snapshot epochs): "
            f"below 1 at {h['dips']['dipped']} of {h['dips']['measured']}, lowest "
            f"{h['dips']['min']:.3f} at epoch {h['dips']['min_epoch']}"
            + (f"; 1 at every one from epoch {h['dips']['stable_from']} on"
               if h['dips']['stable_from'] else "")
            + (" (the running, train-mode accuracy stays at 1: the dips come from batch "
               "norm's running statistics, which eval mode uses and which lag the weights "
               "while the learning rate is high)" if h["dips"]["running_min"] >= 1.0
               else f" (the running, train-mode accuracy's lowest: "
                    f"{h['dips']['running_min']:.3f})"),
            f"- NC1 (train, Tr(Sigma_W Sigma_B^+)/C) at the onset snapshot "
            f"(epoch {h['onset_snapshot']}): {h['nc1_onset']:.4g}",
            f"- NC1 at the last epoch ({h['last_epoch']}): {h['nc1_last']:.4g}, "
            f"{h['ratio']:.1f} x below the onset",
            "- every NC metric of the paper's figures, onset snapshot / last epoch (train): "
            + ", ".join(f"`{m}` {r:.2f}x" if math.isfinite(r) else f"`{m}` down to 0"
                        for m, r in h["ratios"].items()),
        ]
    lines += [
        f"- final training accuracy {h['train_acc']:.4f}, test accuracy {h['test_acc']:.4f}",
        "",
        "## Files",
        "",
        "- `collapse.png`: the collapse curves (train solid, test dashed, dotted line at the"
        " onset)",
        "- `metrics.csv`: every NC metric of every snapshot, train and test (long format)",
        "- `history.csv`: loss, running and eval-mode training accuracy, test accuracy, "
        "learning rate and seconds per epoch",
        "- `run.json`: the run manifest; `config.yaml`: the resolved config, without the keys "
        "that do not apply to mnist5k and the convnet",
        "",
        "## Config",
        "",
        "```yaml",
        cfg_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", help="snapshot.layers for the run (e.g. blocks): the "
                        "layer-wise demo, drawn against depth")
    parser.add_argument("--run", help="run directory for the training (snapshots stay there; "
                        "default runs/results-demo, or runs/results-layers with --layers)")
    parser.add_argument("--results", help="folder that receives the small files and README.md "
                        "(default results/mnist5k-convnet, or results/layerwise-demo)")
    args = parser.parse_args()
    layered = args.layers is not None
    run = Path(args.run or ROOT / "runs" / ("results-layers" if layered else "results-demo"))
    results = Path(args.results or ROOT / "results" / (
        "layerwise-demo" if layered else "mnist5k-convnet"))
    command = "python scripts/make_results.py" + "".join(f" {a}" for a in sys.argv[1:])

    # A run directory that already holds epochs is continued, so the times cover less.
    manifest = run / "run.json"
    done = json.loads(manifest.read_text())["epochs_done"] if manifest.is_file() else 0
    load_start, start, cpu_start = load_average(), time.perf_counter(), time.process_time()
    overrides = [f"snapshot.layers={args.layers}"] if layered else []
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides=overrides)
    train(cfg, run)
    table = analyze(run)
    figure = "layers.png" if layered else "collapse.png"
    epochs = layer_epochs(table, pd.read_csv(run / "history.csv")) if layered else None
    if layered:
        plot_layers(table, run / "figures" / figure, epochs=epochs)
    else:
        plot_runs(table, run / "figures" / figure)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    results.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(run / name, results / name)
    config_text = applicable_config((run / "config.yaml").read_text())
    (results / "config.yaml").write_text(config_text)
    shutil.copyfile(run / "figures" / figure, results / figure)
    history = pd.read_csv(run / "history.csv")
    facts = headline(table[table["layer"] == PENULTIMATE] if layered else table, history)
    load = f"{load_start} / {load_average()}"
    device = json.loads(manifest.read_text()).get("device", "unknown")
    text = readme(config_text, facts, command, seconds, cpu, load, device, done)
    if layered:
        text = layer_readme(text, table, epochs or [])
    (results / "README.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
