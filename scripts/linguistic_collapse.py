"""Linguistic collapse in small GPT-2 models trained on a synthetic language (Wu & Papyan,
"Linguistic Collapse: Neural Collapse in (Large) Language Models", NeurIPS 2024).

Usage::

    nice python scripts/linguistic_collapse.py --out results/linguistic-collapse
    nice python scripts/linguistic_collapse.py --trial 20     # time 20 steps of each model

A family of GPT-2 models (``GPT2LMHeadModel`` from ``GPT2Config``, random initialisation,
one width per model, the same depth) is trained on the same token stream of the synthetic
language of ``toy_language.py`` (fresh text every step: one pass, as language models are
trained), saved with ``save_pretrained`` at a few steps, and every checkpoint is measured
with nctools' token-level path (:func:`nctools.analysis.lm_measure.measure_language_model`,
what ``nctools measure --model hf:FOLDER --dataset text:FILE`` runs) on a held-out
validation text, beside its validation loss. Each model folder holds its tokenizer (a
word-level ``PreTrainedTokenizerFast``), so the command works on it as it stands.

Written to ``--out``: ``metrics.csv`` (one row per model, checkpoint and metric),
``models.csv`` (sizes and timings), ``generator.json`` (the language's settings and the
corpus sizes), ``run.json`` (command, hardware, versions, load), ``training.png`` and
``scale.png``. The model folders and texts go to ``--work``. Resumable: a model whose
``train.json`` exists is not trained again, a checkpoint whose ``metrics.json`` exists is
not measured again (an interrupted training restarts from step 0).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from machine import cpu_model
from toy_language import END, UNKNOWN, LanguageSpec, Lexicon, documents

from nctools.analysis.lm_measure import measure_language_model
from nctools.data.text import load_tokenizer, text_batches, text_documents
from nctools.models.tokens import IGNORE_INDEX

TRAIN_SEED, VAL_SEED = 1, 2  # the text seeds (the lexicon's is in LanguageSpec)
INIT_SEED = 0
HEAD_DIM = 32  # heads = width / HEAD_DIM (at least 1)
MEASURE = {"global_mean": "classes", "cdnv_power": 1}  # Wu & Papyan centre on class means
SHOWN = (("val_loss", "validation loss", False),
         ("nc1", "NC1  Tr(Σ_W Σ_B⁺)/C", True),
         ("cdnv", "CDNV (NC1, Galanti et al.)", True),
         ("gnc2_means", "GNC2  hyperspherical uniformity", True),
         ("unc3", "UNC3  uniform duality (CoV)", True),
         ("ncc_agreement", "NCC agreement (NC4)", False))


# -------------------------------------------------------------------------- text, tokens
def build_tokenizer(lexicon: Lexicon) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the lexicon (ids in its fixed order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(lexicon.words())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=END, unk_token=UNKNOWN,
                                   pad_token=END)


def write_text(path: Path, docs: Iterator[str]) -> int:
    """One document a line; returns the number of words (tokens)."""
    words = 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for doc in docs:
            out.write(doc + "\n")
            words += doc.count(" ") + 1
    tmp.replace(path)
    return words


def train_batches(spec: LanguageSpec, lexicon: Lexicon, tokenizer: Any, seq_len: int,
                  batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The endless training stream: fresh documents from ``TRAIN_SEED``, packed."""
    docs = documents(spec, lexicon, count=sys.maxsize, seed=TRAIN_SEED)
    return text_batches(docs, tokenizer, seq_len, batch_size=batch_size)


# ----------------------------------------------------------------------------- measuring
def measure_checkpoint(folder: str | Path, val_file: str | Path, seq_len: int,
                       batch_size: int, min_count: int) -> dict[str, float]:
    """The metrics of a saved model on a text, as ``nctools measure --model hf:FOLDER
    --dataset text:VAL --seq-len T --batch-size B --min-count K --global-mean classes``
    prints them, plus ``val_loss`` (mean next-token cross-entropy over the same tokens,
    nats), ``val_tokens`` and ``ncc_agreement`` (1 - ``ncc_mismatch``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = load_tokenizer(folder)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        return text_batches(text_documents(f"text:{val_file}"), tokenizer, seq_len,
                            batch_size=batch_size)

    with warnings.catch_warnings():  # the ETF keys: NaN when C > D + 1, as expected
        warnings.filterwarnings("ignore", message=".*simplex.*")
        metrics = measure_language_model(model, batches, min_count=min_count, **MEASURE)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches():
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).double(),
                                           labels.flatten(), ignore_index=IGNORE_INDEX,
                                           reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    metrics["val_loss"] = total / count
    metrics["val_tokens"] = float(count)
    metrics["ncc_agreement"] = 1.0 - metrics["ncc_mismatch"]
    return metrics


# ------------------------------------------------------------------------------ training
def new_model(width: int, layers: int, vocab: int, seq_len: int, end_id: int) -> Any:
    """A randomly initialised GPT-2 (no dropout: the stream never repeats)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(INIT_SEED)
    config = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=width, n_layer=layers,
                        n_head=max(1, width // HEAD_DIM), resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=end_id, eos_token_id=end_id,
                        pad_token_id=end_id)
    return GPT2LMHeadModel(config)


def optimiser(model: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """AdamW (decay on matrices only), linear warm-up then cosine to 10% of the peak."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        done = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(name: str, width: int, args: argparse.Namespace, tokenizer: Any, spec: LanguageSpec,
          lexicon: Lexicon, folder: Path, steps: int, checkpoints: set[int]) -> dict[str, Any]:
    """Train one model for ``steps`` steps, saving the checkpoints; returns its timings."""
    model = new_model(width, args.layers, len(tokenizer), args.seq_len, tokenizer.eos_token_id)
    opt, schedule = optimiser(model, args)
    stream = train_batches(spec, lexicon, tokenizer, args.seq_len, args.batch_size)
    wall, cpu = time.perf_counter(), time.process_time()
    losses: dict[int, float] = {}
    recent: list[float] = []
    loads = [os.getloadavg()[0]]
    for step in range(steps + 1):
        if step in checkpoints:
            out = folder / f"step-{step:05d}"
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            losses[step] = sum(recent) / len(recent) if recent else float("nan")
        if step == steps:
            break
        tick = time.perf_counter()
        batch = next(stream)
        model.train()
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        value = float(loss.detach())
        recent = [*recent[-(args.loss_window - 1):], value]
        if step % 50 == 0:
            loads.append(os.getloadavg()[0])
        print(f"{name} step {step + 1}/{steps} loss {value:.4f} "
              f"lr {schedule.get_last_lr()[0]:.2e} {1000 * (time.perf_counter() - tick):.0f} ms",
              flush=True)
    return {"model": name, "width": width, "layers": args.layers,
            "heads": model.config.n_head,
            "params": sum(p.numel() for p in model.parameters()),
            "train_wall_s": round(time.perf_counter() - wall, 1),
            "train_cpu_s": round(time.process_time() - cpu, 1),
            "mean_load_1min": round(sum(loads) / len(loads), 2),
            "train_loss": {str(k): v for k, v in losses.items()}}


def trial(args: argparse.Namespace, tokenizer: Any, spec: LanguageSpec,
          lexicon: Lexicon) -> None:
    """Time ``args.trial`` steps of each model (after 3 warm-up steps); print the estimate."""
    total = 0.0
    for width in args.widths:
        model = new_model(width, args.layers, len(tokenizer), args.seq_len,
                          tokenizer.eos_token_id)
        opt, _ = optimiser(model, args)
        stream = train_batches(spec, lexicon, tokenizer, args.seq_len, args.batch_size)
        for step in range(3 + args.trial):
            if step == 3:
                wall, cpu = time.perf_counter(), time.process_time()
            loss = model(**next(stream)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        per_step = (time.perf_counter() - wall) / args.trial
        total += per_step * args.steps
        print(f"width {width}: {1000 * per_step:.0f} ms/step wall, "
              f"{1000 * (time.process_time() - cpu) / args.trial:.0f} ms/step CPU, "
              f"{args.steps} steps ~ {per_step * args.steps / 60:.1f} min", flush=True)
    print(f"all models: ~{total / 60:.1f} min of training at load {os.getloadavg()[0]:.1f}")


# ------------------------------------------------------------------------- tables, plots
METRICS_COLUMNS = ("model", "width", "layers", "params", "step", "tokens", "metric", "value")


def metric_rows(info: dict[str, Any], step: int, tokens: int,
                metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Long rows of one checkpoint's finite metrics (the ETF keys are NaN: C > D + 1)."""
    keep = {k: v for k, v in metrics.items() if math.isfinite(v)}
    train_loss = info["train_loss"].get(str(step), float("nan"))
    if math.isfinite(train_loss):
        keep["train_loss"] = train_loss
    return [{"model": info["model"], "width": info["width"], "layers": info["layers"],
             "params": info["params"], "step": step, "tokens": tokens, "metric": k,
             "value": f"{v:.6g}"} for k, v in sorted(keep.items())]


def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_table(metrics_csv: Path) -> dict[str, dict[int, dict[str, float]]]:
    """model -> step -> metric -> value, from ``metrics.csv`` (plus ``params``, ``tokens``)."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            cell = table.setdefault(row["model"], {}).setdefault(int(row["step"]), {})
            cell[row["metric"]] = float(row["value"])
            cell["params"], cell["tokens"] = float(row["params"]), float(row["tokens"])
    return dict(sorted(table.items(), key=lambda kv: int(kv[0].split("-")[0][1:])))


def plot(metrics_csv: Path, out: Path) -> None:
    """``training.png`` (the metrics against training tokens, one line a model) and
    ``scale.png`` (every checkpoint's metric against its validation loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    table = read_table(metrics_csv)
    colours = plt.get_cmap("viridis")
    names = list(table)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (key, title, log) in zip(axes.flat, SHOWN, strict=True):
        for i, name in enumerate(names):
            steps = [s for s in sorted(table[name]) if s > 0]
            ax.plot([table[name][s]["tokens"] for s in steps],
                    [table[name][s][key] for s in steps],
                    "o-", color=colours(i / max(1, len(names) - 1)), label=name)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # 2e5, 3e5, ... would overlap
        ax.set_yscale("log" if log else "linear")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("GPT-2 widths on a synthetic language: token-level collapse through training")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
    for ax, (key, title, log) in zip(axes, SHOWN[1:], strict=True):
        for i, name in enumerate(names):
            steps = [s for s in sorted(table[name]) if s > 0]
            ax.plot([table[name][s]["val_loss"] for s in steps],
                    [table[name][s][key] for s in steps], "o-",
                    color=colours(i / max(1, len(names) - 1)), label=name, alpha=0.8)
            last = steps[-1]
            ax.plot(table[name][last]["val_loss"], table[name][last][key], "k*", ms=9)
        ax.set_yscale("log" if log else "linear")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("validation loss (nats)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("each checkpoint's metric against its validation loss (★ the last)")
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's of the ranks (ties share their mean rank)."""
    def ranks(v: list[float]) -> torch.Tensor:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = torch.empty(len(v), dtype=torch.float64)
        start = 0
        for _, group in itertools.groupby(order, key=v.__getitem__):
            members = list(group)
            out[members] = start + (len(members) - 1) / 2
            start += len(members)
        return out

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / (rx.norm() * ry.norm()))


def summary(metrics_csv: Path) -> str:
    """Markdown tables: every trained checkpoint's metrics, and each metric's Spearman
    correlation with the validation loss (over all trained checkpoints, and over the last
    checkpoint of each model: the scale axis)."""
    table = read_table(metrics_csv)
    keys = [k for k, _, _ in SHOWN]
    lines = ["| model | params | step | tokens | " + " | ".join(keys) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(keys)]
    points: list[dict[str, float]] = []
    for name, steps in table.items():
        for step, cell in steps.items():
            lines.append(f"| {name} | {int(cell['params']):,} | {step} | "
                         f"{int(cell['tokens']):,} | "
                         + " | ".join(f"{cell[k]:.4g}" for k in keys) + " |")
            if step > 0:
                points.append(cell)
    last = [steps[max(steps)] for steps in table.values()]
    lines += ["", "| metric | Spearman with val loss, all trained checkpoints "
              f"(n = {len(points)}) | the last checkpoints (n = {len(last)}) |",
              "|---|---:|---:|"]
    for key in keys[1:]:
        rho = [spearman([p[key] for p in group], [p["val_loss"] for p in group])
               for group in (points, last)]
        lines.append(f"| {key} | {rho[0]:+.2f} | {rho[1]:+.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/linguistic-collapse"))
    p.add_argument("--work", type=Path, default=Path("runs/linguistic-collapse"),
                   help="model folders and texts (default runs/linguistic-collapse)")
    p.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")],
                   default=[32, 64, 128, 256], help="comma-separated (default 32,64,128,256)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--checkpoints", type=lambda s: [int(c) for c in s.split(",")],
                   help="steps to save and measure (default 0 and steps/16 ... steps)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences a step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens a sequence (context)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="steps of linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--loss-window", type=int, default=50,
                   help="train_loss at a checkpoint: the mean of the last N steps")
    p.add_argument("--val-docs", type=int, default=2000, help="documents of validation text")
    p.add_argument("--min-count", type=int, default=10,
                   help="measure the tokens with at least K validation samples")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared CPU)")
    p.add_argument("--trial", type=int, metavar="N", help="time N steps of each model, stop")
    p.add_argument("--redraw", action="store_true",
                   help="only redraw OUT's figures and summary.md from OUT/metrics.csv")
    args = p.parse_args(argv)
    if args.checkpoints is None:
        args.checkpoints = [0, *(args.steps // 2**k for k in range(4, -1, -1))]
    args.checkpoints = sorted(set(args.checkpoints))
    if max(args.checkpoints) != args.steps or min(args.checkpoints) < 0:
        p.error(f"--checkpoints: must lie in [0, --steps] and end at --steps = {args.steps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.redraw:
        plot(args.out / "metrics.csv", args.out)
        text = summary(args.out / "metrics.csv")
        (args.out / "summary.md").write_text(text)
        print(text, end="")
        return
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # one progress line a step, nothing else
    spec = LanguageSpec()
    lexicon = Lexicon.build(spec)
    tokenizer = build_tokenizer(lexicon)
    if args.trial:
        trial(args, tokenizer, spec, lexicon)
        return
    start_wall, start_cpu, start_load = time.perf_counter(), time.process_time(), os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    val_file = args.work / "val.txt"
    val_words = write_text(val_file, documents(spec, lexicon, args.val_docs, VAL_SEED))
    tokens_per_step = args.batch_size * args.seq_len
    rows: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    measured: dict[str, float] = {}
    trained: list[str] = []
    fresh = 0  # checkpoints measured by this invocation
    for width in args.widths:
        name = f"w{width}-l{args.layers}"
        folder = args.work / "models" / name
        done = folder / "train.json"
        if not done.is_file():
            info = train(name, width, args, tokenizer, spec, lexicon, folder, args.steps,
                         set(args.checkpoints))
            done.write_text(json.dumps(info, indent=1))
            trained.append(name)
        info = json.loads(done.read_text())
        info["measure_wall_s"] = info["measure_cpu_s"] = 0.0
        for step in sorted(args.checkpoints):
            checkpoint = folder / f"step-{step:05d}"
            cached, timing = checkpoint / "metrics.json", checkpoint / "measure.json"
            if not cached.is_file():
                wall, cpu = time.perf_counter(), time.process_time()
                metrics = measure_checkpoint(checkpoint, val_file, args.seq_len,
                                             args.batch_size, args.min_count)
                timing.write_text(json.dumps({"wall_s": time.perf_counter() - wall,
                                              "cpu_s": time.process_time() - cpu}))
                cached.write_text(json.dumps(metrics, indent=1))
                fresh += 1
            metrics = json.loads(cached.read_text())
            seconds = json.loads(timing.read_text())
            info["measure_wall_s"] = round(info["measure_wall_s"] + seconds["wall_s"], 1)
            info["measure_cpu_s"] = round(info["measure_cpu_s"] + seconds["cpu_s"], 1)
            measured = metrics
            rows += metric_rows(info, step, step * tokens_per_step, metrics)
            print(f"{name} step {step}: val_loss {metrics['val_loss']:.4f} nc1 "
                  f"{metrics['nc1']:.4g} cdnv {metrics['cdnv']:.4g} gnc2 "
                  f"{metrics['gnc2_means']:.4g} unc3 {metrics['unc3']:.4g} ncc_agreement "
                  f"{metrics['ncc_agreement']:.4f}", flush=True)
        models.append(info)
    write_csv(args.out / "metrics.csv", rows, METRICS_COLUMNS)
    columns = ("model", "width", "layers", "heads", "params", "train_wall_s", "train_cpu_s",
               "mean_load_1min", "measure_wall_s", "measure_cpu_s")
    write_csv(args.out / "models.csv", [{k: m[k] for k in columns} for m in models], columns)
    settings = {"language": spec.to_dict(), "train_seed": TRAIN_SEED, "val_seed": VAL_SEED,
                "vocabulary": len(tokenizer), "val_docs": args.val_docs,
                "val_words": val_words,
                "val_sha256": hashlib.sha256(val_file.read_bytes()).hexdigest(),
                "val_tokens_measured": int(measured["val_tokens"]),
                "classes_measured": int(measured["classes_measured"]),
                "train_tokens_per_model": args.steps * tokens_per_step,
                "sample": list(itertools.islice(documents(spec, lexicon, 3, VAL_SEED), 3))}
    (args.out / "generator.json").write_text(json.dumps(settings, indent=1) + "\n")
    record = args.out / "run.json"  # a resumed run adds to the invocations before it
    previous = json.loads(record.read_text())["invocations"] if record.is_file() else []
    run = {"command": "nice python " + " ".join(sys.argv),
           "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "measure_options": {**MEASURE, "min_count": args.min_count},
           "date": datetime.date.today().isoformat(), "cpu": cpu_model(),
           "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": __import__("transformers").__version__,
           "tokenizers": __import__("tokenizers").__version__,
           "train_wall_s": round(sum(m["train_wall_s"] for m in models), 1),
           "train_cpu_s": round(sum(m["train_cpu_s"] for m in models), 1),
           "measure_wall_s": round(sum(m["measure_wall_s"] for m in models), 1),
           "measure_cpu_s": round(sum(m["measure_cpu_s"] for m in models), 1),
           "invocations": [*previous, {
               "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "trained": trained, "checkpoints_measured": fresh,
               "wall_s": round(time.perf_counter() - start_wall, 1),
               "cpu_s": round(time.process_time() - start_cpu, 1),
               "load_average_start": [round(x, 2) for x in start_load],
               "load_average_end": [round(x, 2) for x in os.getloadavg()]}]}
    (args.out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    plot(args.out / "metrics.csv", args.out)
    (args.out / "summary.md").write_text(summary(args.out / "metrics.csv"))
    print(f"wrote {args.out}: {len(rows)} metric rows, {len(models)} models")


if __name__ == "__main__":
    main()
