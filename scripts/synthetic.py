"""The one synthetic-data generator of the benchmark scripts: Gaussian class clusters.

Usage (from another script in this folder)::

    from synthetic import clusters, zipf_tokens, chunks
    labels, rows_of, weight, bias = clusters(n=50_000, dim=512, num_classes=10)
    features = rows_of(slice(0, 50_000))       # (n, dim) float32, made on demand

    # a token stream: GPT-2's vocabulary, Zipf-distributed labels as text has
    labels, rows_of, weight, bias = zipf_tokens(n=1_000_000)
    for features, labels_chunk in chunks(labels, rows_of, 65_536):
        ...                                    # (65_536, 768) float32, (65_536,) int64

Every class of ``clusters`` has at least one sample; the classifier lies near the class
means. The noise is a tiled block of 8191 rows, so features for millions of rows are made
at memory speed and any slice of them can be regenerated (a 2 GB snapshot is written chunk
by chunk); the stream is the same whatever the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

NOISE_ROWS = 8191  # prime, so the tiling does not line up with chunk sizes
GPT2_VOCAB = 50_257  # GPT-2's vocabulary: the classes of a token-level measurement
GPT2_DIM = 768  # GPT-2 small's hidden size

RowsOf = Callable[[slice], torch.Tensor]


def clusters(
    n: int, dim: int, num_classes: int, seed: int = 0, spread: float = 2.0
) -> tuple[torch.Tensor, RowsOf, torch.Tensor, torch.Tensor]:
    """labels (n,), a function rows -> features (rows, dim) float32, weight (C, dim), bias (C,).

    Class means are ``spread`` times standard normal vectors; features are mean + N(0, I).
    """
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen) * spread
    labels = torch.cat([torch.arange(num_classes),  # every class present
                        torch.randint(0, num_classes, (n - num_classes,), generator=gen)])
    labels = labels[torch.randperm(n, generator=gen)]
    return _around_means(labels, means, gen)


def zipf_tokens(
    n: int, dim: int = GPT2_DIM, num_classes: int = GPT2_VOCAB, seed: int = 0,
    exponent: float = 1.0, spread: float = 2.0,
) -> tuple[torch.Tensor, RowsOf, torch.Tensor, torch.Tensor]:
    """A token stream: labels (n,), rows -> features (rows, dim) float32, weight, bias.

    The token of frequency rank r (1-based) is drawn with probability proportional to
    r^-exponent (Zipf's law; text has an exponent near 1), the ranks spread over the
    token ids by a seeded permutation, so many tokens are rare or absent as in a corpus
    (Wu & Papyan 2024 measure those with enough samples). Features are class mean +
    N(0, I) as in :func:`clusters`; the labels (8 bytes a token) are held, the features
    are made on demand.
    """
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen) * spread
    token_of_rank = torch.randperm(num_classes, generator=gen)
    weights = torch.arange(1, num_classes + 1, dtype=torch.float64).pow(-exponent)
    ranks = torch.multinomial(weights, n, replacement=True, generator=gen)
    return _around_means(token_of_rank[ranks], means, gen)


def _around_means(labels: torch.Tensor, means: torch.Tensor, gen: torch.Generator
                  ) -> tuple[torch.Tensor, RowsOf, torch.Tensor, torch.Tensor]:
    noise = torch.randn(min(NOISE_ROWS, labels.shape[0]), means.shape[1], generator=gen)

    def rows_of(rows: slice) -> torch.Tensor:
        index = torch.arange(rows.start, rows.stop) % noise.shape[0]
        return means[labels[rows]] + noise[index]

    weight = means + 0.5 * torch.randn(means.shape, generator=gen)
    return labels, rows_of, weight, torch.zeros(means.shape[0])


def chunks(labels: torch.Tensor, rows_of: RowsOf, chunk: int
           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features (<= chunk, dim), labels) chunk after chunk: memory holds one chunk."""
    for start in range(0, labels.shape[0], chunk):
        rows = slice(start, min(start + chunk, labels.shape[0]))
        yield rows_of(rows), labels[rows]
