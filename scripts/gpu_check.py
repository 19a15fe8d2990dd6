"""Check nctools on a CUDA GPU: a ResNet18 training epoch and a million-sample measurement.

Usage::

    python scripts/gpu_check.py                    # any machine with an NVIDIA GPU
    python scripts/gpu_check.py --out runs/gpu     # keep the run directory

1. ``nctools.training.loop`` runs ResNet18 (CIFAR stem, D = 512) on CIFAR-shaped synthetic data,
   50,000 training images of 3 x 32 x 32 in 10 classes (and 10,000 test images), batch
   128, bf16 autocast and channels_last, for 3 epochs: epoch 1 warms cuDNN up, epoch 2
   is the steady-state epoch reported (training plus the test-set evaluation), epoch 3
   also extracts and writes a snapshot.
2. One cell of the paper's grid, ``papyan2020/cifar10-resnet18`` as shipped (fp32, SGD,
   batch 128, a test pass every epoch), on synthetic data of CIFAR10's shape, for 3
   epochs (the learning-rate drops scaled to them, a snapshot at the last): the steady
   epoch's seconds, what 350 of them take, and the sustained TFLOP/s they imply next to
   the FLOP estimate of docs/paper-settings.md (``scripts/paper_networks.py``).
3. ``nctools.metrics.measure`` on the GPU: N = 1,000,000 features of D = 512 in C = 1,000 classes
   (float32, 2 GB), after a warm-up call; a 20,000-row subset is also measured on the CPU
   and must agree to 1e-9 (relative; metrics above 1e-6).
4. Language models (docs/language-models.md): a tiny GPT-2 (random weights, GPT-2's
   vocabulary of 50,257 tokens, width 64, float64) measured token by token on the GPU
   with NC4 on every token (``measure_language_model``, its float32 pair tiles), against
   the same measurement on the CPU in float64 throughout (``pair_precision="float64"``):
   every key within 1e-6 (relative), NC4's counts equal. Then GPT-2's scale on the GPU,
   ``scripts/bench_lm.py``'s synthetic stream (C = 50,257, D = 768, 10^6 Zipf tokens) with
   NC4 on every token, beside its baseline (one read + one tiled float32 Gram of the means).

Prints the GPU name and the times. Without a CUDA device it checks that the paper cell's
config loads and runs the tiny GPT-2 check on the CPU (the CPU-safe parts), prints why it
stops and exits with status 1. For several GPUs, train the same config under torchrun
(the command is printed).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from nctools.config.schema import Config


def train_epoch(out: Path) -> tuple[float, float, Path]:
    """Seconds of the first and the steady-state epoch of ResNet18 on synthetic CIFAR."""
    from nctools.config.schema import (
        Config,
        DataConfig,
        ModelConfig,
        SnapshotConfig,
        TrainConfig,
    )
    from nctools.runs import store
    from nctools.runs.store import save_config
    from nctools.training.loop import train

    config = Config(
        name="gpu-check",
        data=DataConfig(dataset="synthetic", num_classes=10, train_per_class=5000,
                        test_per_class=1000, channels=3, image_size=32),
        model=ModelConfig(arch="resnet18"),
        train=TrainConfig(epochs=3, batch_size=128, lr=0.05, device="cuda", bf16=True,
                          channels_last=True),
        snapshot=SnapshotConfig(epochs=[3]),
    )
    run = train(config, out / "run")
    save_config(config, out / "gpu-check.yaml")
    seconds = store.read_history(run)["seconds"].tolist()
    return seconds[0], seconds[1], out / "gpu-check.yaml"


PAPER_CELL = "papyan2020/cifar10-resnet18"
# CIFAR10's shape in Gaussian class clusters: 10 classes, 5,000 training and 1,000 test
# images of 3 x 32 x 32, all kept
CIFAR_SHAPED = ("data.dataset=synthetic", "data.num_classes=10", "data.channels=3",
                "data.image_size=32", "data.train_per_class=5000", "data.test_per_class=1000",
                "data.samples_per_class=null")


def paper_cell_config(epochs: int = 3, device: str = "cuda") -> Config:
    """The shipped ``PAPER_CELL`` on CIFAR-shaped synthetic data for ``epochs`` epochs."""
    from nctools.config.schema import load_config

    return load_config(PAPER_CELL, [*CIFAR_SHAPED, f"train.epochs={epochs}",
                                    "train.milestones=[0.3333,0.6667]",
                                    f"snapshot.epochs=[{epochs}]", f"train.device={device}"])


def paper_cell(config: Config, out: Path) -> tuple[float, float, float]:
    """Seconds of the steady epoch (the second) of ``config``; the GPU hours of the shipped
    cell's epochs at that pace; the TFLOP/s it sustains by the FLOP count of
    scripts/paper_networks.py (3 forwards per training image, one per test image)."""
    from paper_networks import GRID, cell

    from nctools.config.schema import load_config
    from nctools.runs import store
    from nctools.training.loop import train

    run = train(config, out / "paper-cell")
    steady = store.read_history(run)["seconds"].tolist()[1]
    facts = cell(GRID / (PAPER_CELL.split("/")[1] + ".yaml"))
    data = config.data
    images = data.num_classes * (3 * data.train_per_class + data.test_per_class)
    hours = load_config(PAPER_CELL).train.epochs * steady / 3600
    return steady, hours, facts.forward_flops * images / steady / 1e12


def measure_large(n: int = 1_000_000, dim: int = 512, num_classes: int = 1000) -> float:
    """Seconds of ``nctools.measure`` on (n, dim) CUDA features; checks a subset on the CPU."""
    from nctools.metrics.measure import measure

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    means = torch.randn(num_classes, dim, generator=gen, device=device) * 2
    labels = torch.randint(0, num_classes, (n,), generator=gen, device=device)
    features = means[labels] + torch.randn(n, dim, generator=gen, device=device)
    weight = means + 0.5 * torch.randn(num_classes, dim, generator=gen, device=device)

    subset = slice(0, 20_000)
    gpu = measure(features[subset], labels[subset], weight)  # also the warm-up
    cpu = measure(features[subset].cpu(), labels[subset].cpu(), weight.cpu())
    for key, value in cpu.items():
        if abs(value) > 1e-6 and not math.isclose(gpu[key], value, rel_tol=1e-9):
            raise SystemExit(f"gpu_check: {key} differs on the GPU ({gpu[key]!r}) and the "
                             f"CPU ({value!r})")
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = measure(features, labels, weight)  # floats out: the GPU work is done
    seconds = time.perf_counter() - start
    if not result["accuracy"] > 0.9:
        raise SystemExit(f"gpu_check: accuracy {result['accuracy']} on separable clusters")
    return seconds


LM_KEYS_EQUAL = ("ncc_mismatch", "accuracy", "ncc_accuracy", "classes_measured")


def lm_tokens(device: str = "cuda", sequences: int = 64, seq_len: int = 128) -> float:
    """Seconds of a tiny GPT-2's token measurement on ``device``, NC4 on every token;
    checked against the CPU's float64 measurement of the same model (SystemExit if not).

    The model runs in float64 on both, so the token features agree to rounding and any
    difference is the measurement's: float32 pair tiles and float32 NC4 scores (whose
    decisions are float64's, :class:`nctools.metrics.decisions.SureArgmax`) on ``device``.
    Token ids are Zipf-distributed over the vocabulary, as in text; every key is defined.
    """
    import warnings

    from synthetic import GPT2_VOCAB
    from transformers import GPT2Config, GPT2LMHeadModel

    from nctools.analysis.lm_measure import measure_language_model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=seq_len, n_embd=64, n_layer=2,
                        n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).double().eval()
    gen = torch.Generator().manual_seed(0)
    zipf = torch.arange(1, GPT2_VOCAB + 1, dtype=torch.float64).reciprocal()
    ranks = torch.multinomial(zipf, sequences * seq_len, replacement=True, generator=gen)
    ids = torch.randperm(GPT2_VOCAB, generator=gen)[ranks].view(sequences, seq_len)
    # a first token of its own for each sequence: no two positions share their context,
    # so no two tokens' features (and no two singleton classes' means) coincide
    ids[:, 0] = torch.arange(sequences)
    batches = [{"input_ids": ids[i : i + 16]} for i in range(0, sequences, 16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # C > D + 1: the ETF keys' NaN is expected
        want = measure_language_model(model, batches, pair_precision="float64")
        model.to(device)
        measure_language_model(model, batches[:1])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        got = measure_language_model(model, batches)  # floats out: the work is done
        seconds = time.perf_counter() - start
    undefined = [k for k in ("cdnv", "gnc2_means", "gnc2_weights", "nc1") if math.isnan(want[k])]
    tokens = sequences * (seq_len - 1)  # a causal LM: the next token of each position
    if undefined or "ncc_samples" in got or not got["classes_measured"] > tokens / 4:
        raise SystemExit(f"gpu_check: the tiny GPT-2 measured {got.get('classes_measured')} "
                         f"tokens, NC4 on {got.get('ncc_samples', 'every')} token, "
                         f"{', '.join(undefined) or 'no key'} NaN")
    for key, value in want.items():
        same = (got[key] == value if key in LM_KEYS_EQUAL or not math.isfinite(value)
                else math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-12))
        if not same and not (math.isnan(value) and math.isnan(got[key])):
            raise SystemExit(f"gpu_check: {key} of the tiny GPT-2 differs on {device} "
                             f"({got[key]!r}) and in float64 on the CPU ({value!r})")
    return seconds


def lm_vocabulary(tokens: int = 1_000_000, dim: int = 768, chunk: int = 65_536,
                  device: str = "cuda") -> tuple[float, float, dict[str, float]]:
    """Seconds of GPT-2's scale on the GPU, NC4 on every token, and of its baseline.

    ``scripts/bench_lm.py``'s stream made on the GPU (class means 2 N(0, I), features mean
    + N(0, I) from a tiled noise block, Zipf labels over 50,257 tokens, the classifier the
    means plus 0.5 N(0, I)), measured as ``bench_lm.py`` measures it but with NC4 on every
    token; the baseline is one read into class sums plus one tiled float32 Gram.
    """
    import warnings

    from synthetic import GPT2_VOCAB, NOISE_ROWS

    from nctools.metrics.measure import measure_chunks

    gen = torch.Generator(device=device).manual_seed(0)
    means = torch.randn(GPT2_VOCAB, dim, generator=gen, device=device) * 2
    zipf = torch.arange(1, GPT2_VOCAB + 1, dtype=torch.float64, device=device).reciprocal()
    ranks = torch.multinomial(zipf, tokens, replacement=True, generator=gen)
    labels = torch.randperm(GPT2_VOCAB, generator=gen, device=device)[ranks]
    noise = torch.randn(NOISE_ROWS, dim, generator=gen, device=device)
    weight = means + 0.5 * torch.randn(means.shape, generator=gen, device=device)

    def chunks():
        for start in range(0, tokens, chunk):
            rows = torch.arange(start, min(start + chunk, tokens), device=device)
            yield means[labels[rows]] + noise[rows % NOISE_ROWS], labels[rows]

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sums = torch.zeros(GPT2_VOCAB, dim, device=device)
    for feats, labs in chunks():
        sums.index_add_(0, labs, feats)
    class_means = sums / torch.bincount(labels, minlength=GPT2_VOCAB).clamp_min(1)[:, None]
    total = torch.zeros((), device=device)
    for row in range(0, GPT2_VOCAB, 2048):
        total += (class_means[row : row + 2048] @ class_means.T).sum()
    float(total)
    baseline = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # C > D + 1: the ETF keys' NaN is expected
        start = time.perf_counter()
        result, _ = measure_chunks(chunks, weight, drop_empty=True, argmax_all_classes=True,
                                   etf_without_simplex=False, pair_precision="float32")
        seconds = time.perf_counter() - start
    if "ncc_samples" in result or not result["ncc_accuracy"] > 0.9:
        raise SystemExit(f"gpu_check: NC4 at GPT-2's scale: {result}")
    return seconds, baseline, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="run directory to keep (default: temporary)")
    args = parser.parse_args()
    cell_config = paper_cell_config()  # on any machine: a config error shows without a GPU
    if not torch.cuda.is_available():
        seconds = lm_tokens("cpu")
        print(f"tiny GPT-2 (V = 50,257, D = 64), NC4 on every token, on the CPU: {seconds:.1f} s, "
              "within 1e-6 of float64", flush=True)
        print("gpu_check: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "run this on a machine with an NVIDIA GPU", file=sys.stderr)
        raise SystemExit(1)
    print(f"GPU: {torch.cuda.get_device_name()} (torch {torch.__version__}, "
          f"CUDA {torch.version.cuda})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        first, steady, config = train_epoch(out)
        print(f"ResNet18, 50,000 x 3 x 32 x 32, batch 128, bf16 + channels_last: "
              f"first epoch {first:.1f} s, steady epoch {steady:.1f} s", flush=True)
        kept = config if args.out else "CONFIG (pass --out to keep gpu-check.yaml)"
        print(f"  several GPUs: torchrun --nproc_per_node=K -m nctools train {kept} --out RUN",
              flush=True)
        steady, hours, tflops = paper_cell(cell_config, out)
        print(f"{PAPER_CELL} (fp32) on CIFAR-shaped synthetic data: steady epoch "
              f"{steady:.1f} s, {hours:.2f} GPU hours for all the cell's epochs at that pace; "
              f"{tflops:.1f} TFLOP/s sustained", flush=True)
        seconds = measure_large()
        print(f"measure N=1,000,000 D=512 C=1,000 on the GPU: {seconds:.2f} s", flush=True)
        seconds = lm_tokens()
        print(f"tiny GPT-2 (V = 50,257, D = 64, 8,128 tokens), NC4 on every token, on the "
              f"GPU: {seconds:.2f} s, within 1e-6 of float64 on the CPU", flush=True)
        seconds, baseline, result = lm_vocabulary()
        print(f"GPT-2's scale (C = 50,257, D = 768, 10^6 Zipf tokens, "
              f"{int(result['classes_measured'])} measured), NC4 on every token, on the GPU: "
              f"{seconds:.1f} s, {seconds / baseline:.1f}x one read + a float32 Gram "
              f"({baseline:.2f} s)")


if __name__ == "__main__":
    main()
