"""`Engine`: the two streaming passes behind every nctools measurement (docs/metrics.md).

Usage::

    engine = Engine(10, {"fc": (weight, bias), "layer3": (None, None)})
    for _ in range(2):                                 # two passes over the same samples
        for features, labels in batches():             # {layer: (n, D)}, (n,)
            engine.update(features, labels)
        engine.end_pass()
    metrics = engine.result()                          # {layer: {key: float}}

Papyan, Han & Donoho (PNAS 2020) define every metric about the class means, so the
samples are read twice, in float64 blocks (:class:`~nctools.metrics.stats.ClassStats`):

1. the first pass gathers class counts and sums: the class means mu_c and the global
   mean mu_G;
2. between the passes, Sigma_B's eigenpairs come from the centred means (no D x D
   matrix). Sigma_B^+ lives in the span of its r <= C - 1 eigenvectors V, so when
   0 < r < D/2 (and the MSE decomposition, which needs all of Sigma_W, is not asked for)
   the second pass keeps Sigma_W only in that span, as an r x r moment;
3. the second pass re-centres every sample on its exact class mean (second moments free
   of cancellation) and tallies NC4's two decision rules (:class:`DecisionTally`); the
   same product x @ V serves the nearest-class-centre rule.

Every metric then comes from the second pass's statistics (:mod:`functional`); one the
data leave undefined is NaN with a warning. Inputs are not checked here: the public
entry points (``nctools.measure``, ``measure_chunks``, ``measure_model``, ``NCMetric``)
check them once; the engine reports only what a pass finds (no samples, NaN or Inf, an
empty class, another number of rows the second time). Statistics are summed across
processes only when ``sync`` is asked for.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from nctools.metrics import functional, vocab
from nctools.metrics.decisions import DecisionTally
from nctools.metrics.inputs import check_pass_classes, check_pass_rows
from nctools.metrics.stats import ClassStats
from nctools.metrics.vocab import check_vocabulary_options

F64 = torch.float64

METRIC_KEYS = (
    "nc1", "nc1_ratio", "cdnv",
    "equinorm_means", "equinorm_weights", "equiangular_means", "equiangular_weights",
    "maxangle_means", "maxangle_weights", "etf_means", "etf_weights",
    "self_duality",
    "ncc_mismatch", "accuracy", "ncc_accuracy",
)  # fmt: skip

# docs/metrics.md "Beyond the paper", returned after METRIC_KEYS when defined: nc5 and
# nc5_uncentred need ood_features, the mse_* keys need mse_weight_decay (lambda of the objective
# (1/2N) sum ||W h + b - e_y||^2 + (lambda/2)(||W||^2 + ||b||^2); for a network trained by
# nctools with loss mse (squared error summed over classes, averaged over samples) and SGD
# weight decay wd, the objective is twice that with lambda = wd / 2: pass wd / 2).
BEYOND_KEYS = (
    "separation_fuzziness",
    "gnc2_means", "gnc2_weights", "gnc2_energy_means", "gnc2_energy_weights",
    "duality_cos", "unc3", "self_duality_etf",
    "nc5", "nc5_uncentred",
    "mse_nc1", "mse_nc23", "mse_perp",
)  # fmt: skip

# Without a classifier (an intermediate layer), the keys that need none (docs/metrics.md).
CLASSIFIER_FREE_KEYS = (
    "nc1", "nc1_ratio", "cdnv", "separation_fuzziness",
    "equinorm_means", "equiangular_means", "maxangle_means", "etf_means",
    "gnc2_means", "gnc2_energy_means", "ncc_accuracy",
)  # fmt: skip

# The keys whose target is the simplex ETF: C unit vectors with pairwise cosine -1/(C-1)
# exist only in D >= C - 1 dimensions, so for C > D + 1 (a vocabulary) they can be left
# NaN with a warning (``etf_without_simplex=False``), GNC2 / UNC3 being the ones to read
# (Wu & Papyan 2024, docs/language-models.md); their C x C pairs are then not computed.
ETF_KEYS = (
    "equiangular_means", "equiangular_weights", "maxangle_means", "maxangle_weights",
    "etf_means", "etf_weights", "self_duality_etf",
)  # fmt: skip
TRAIN_SPLIT = "train"

# Keys built on the centred class means M~: undefined when every class mean coincides.
_MEANS_KEYS = (
    "nc1", "nc1_ratio", "cdnv", "equinorm_means", "equiangular_means", "maxangle_means",
    "etf_means", "self_duality", "separation_fuzziness", "gnc2_means", "gnc2_energy_means",
    "duality_cos", "unc3", "self_duality_etf", "nc5",
)  # fmt: skip


class Layer:
    """One layer's state through the two passes.

    Args:
        weight: (C, D) float64 classifier rows, or None (the classifier-free keys).
        bias: (C,) float64, or None (zero; only with a weight).
        class_means: (C, D) float64 centres of the NCC rule from another split (docs/
            metrics.md, "On other data"); None: these samples' own class means.
        mse_weight_decay: lambda of the MSE decomposition, or None (not reported).
        ood: report ``nc5`` and ``nc5_uncentred`` from the features
            :meth:`Engine.update_ood` adds.
    """

    def __init__(self, weight: Tensor | None = None, bias: Tensor | None = None,
                 class_means: Tensor | None = None,
                 mse_weight_decay: float | None = None, ood: bool = False) -> None:
        self.weight, self.class_means = weight, class_means
        if weight is not None and bias is None:
            bias = weight.new_zeros(weight.shape[0])
        self.bias, self.mse = bias, mse_weight_decay
        self.stats: ClassStats | None = None  # the pass under way, then the second's
        self.first_counts: Tensor | None = None  # (C,) the first pass's class counts
        self.means = self.centre = torch.empty(0, dtype=F64)  # mu_c (C, D), mu_G (D,)
        self.eig: tuple[Tensor, Tensor] | None = None
        self.tally: DecisionTally | None = None
        self.wants_ood, self.ood_reduced = ood, False
        self.ood: ClassStats | None = None  # counts and sums of the OOD features: nc5

    @property
    def dim(self) -> int:
        return 0 if self.stats is None else self.stats.dim


class Engine:
    """The two passes of :mod:`nctools.metrics.engine` over one or more layers' features.

    Args:
        num_classes: C (>= 2), the classes the labels number.
        layers: name -> :class:`Layer`; a bare (weight, bias) pair is taken as one.
        device: where the statistics live.
        global_mean: ``"samples"`` (mu_G, the mean of all samples) or ``"classes"`` (the
            mean of the class means).
        drop_empty: measure the classes that have samples instead of raising for empty
            ones (results then carry ``classes_measured``).
        class_ids: (C,) the ids the caller knows the classes by, for messages.
        source: what the samples came from, for messages (``"chunks"``, ``"data"``).
        ood_source: what the OOD features came from, for messages.
        sync: sum the statistics over the processes of ``group`` at each :meth:`end_pass`
            (torch.distributed); the default keeps to this process's samples.
        min_count, top_k: measure only the classes with at least ``min_count`` samples,
            then the ``top_k`` most frequent (:func:`nctools.metrics.vocab.frequent_classes`,
            decided from the first pass's counts; the other classes' samples are left out
            and the results carry ``classes_measured``).
        cdnv_power: the power of the class distance in CDNV (1, or 2 as Wu & Papyan's code).
        ncc_samples: tally NC4 on this many samples only, evenly spaced through the second
            pass (deterministic); the results carry ``ncc_samples``. None: every sample.
        argmax_all_classes: the classifier decides among all C classes even when fewer
            are measured (a language model's own argmax over the whole vocabulary); a
            decision for a class not measured is wrong and disagrees with the NCC rule.
        etf_without_simplex: compute the ``ETF_KEYS`` also when C > D + 1 (where no
            simplex ETF exists); False: NaN with a warning, and their cost is saved.
        pair_precision: ``"float64"``, or ``"float32"``: the tiles of GNC2 and CDNV's
            C^2 / 2 class pairs in float32, their sums in float64
            (:func:`functional.pair_statistics`; ~1e-7 relative at vocabulary scale).
    """

    def __init__(self, num_classes: int, layers: Mapping[str, Layer | tuple], *,
                 device: torch.device | str = "cpu", global_mean: str = "samples",
                 drop_empty: bool = False, class_ids: Tensor | None = None,
                 source: str = "chunks", ood_source: str = "ood_features", sync: bool = False,
                 group: dist.ProcessGroup | None = None, min_count: int = 1,
                 top_k: int | None = None, cdnv_power: int = 1,
                 ncc_samples: int | None = None, argmax_all_classes: bool = False,
                 etf_without_simplex: bool = True, pair_precision: str = "float64") -> None:
        self.num_classes, self.device = num_classes, torch.device(device)
        self.layers = {name: spec if isinstance(spec, Layer) else Layer(*spec)
                       for name, spec in layers.items()}
        self.global_mean, self.drop_empty, self.source = global_mean, drop_empty, source
        self.ood_source = ood_source
        self.class_ids = torch.arange(num_classes) if class_ids is None else class_ids.cpu()
        self.sync = sync and dist.is_available() and dist.is_initialized()
        self.group = group
        self.passes_done = 0
        self.remap: Tensor | None = None  # old -> new label once empty classes are dropped
        check_vocabulary_options(min_count, top_k, cdnv_power, ncc_samples, pair_precision)
        self.min_count, self.top_k, self.cdnv_power = min_count, top_k, cdnv_power
        self.filters = drop_empty or min_count > 1 or top_k is not None
        self.ncc_samples, self.argmax_all = ncc_samples, argmax_all_classes
        self.sampler: _Sampler | None = None
        self.etf_without_simplex = etf_without_simplex
        self.pair_dtype = functional.PAIR_DTYPES[pair_precision]

    # ----------------------------------------------------------------- the passes
    def update(self, features: Tensor | Mapping[str, Tensor], labels: Tensor) -> None:
        """Add a chunk: features (n, D) of the one layer, or {layer: (n, D_layer)}, with
        labels (n,) integers in [0, C), as the entry points have checked them."""
        if isinstance(features, Tensor):
            features = {name: features for name in self.layers}
        labels = labels.to(self.device, torch.long)
        keep: Tensor | None = None
        if self.remap is not None:
            labels = self.remap.to(labels.device)[labels]
            keep = labels >= 0  # the samples of classes left out are not measured
            labels = labels[keep] if not bool(keep.all()) else labels
        for name, layer in self.layers.items():
            feats = features[name]
            if keep is not None and labels.shape[0] != feats.shape[0]:
                feats = feats[keep.to(feats.device)]
            if layer.stats is None:
                self._start(layer, feats.shape[1])
            assert layer.stats is not None
            on_block = None if layer.tally is None else layer.tally.add
            if on_block is not None and self.sampler is not None:
                on_block = self.sampler.wrap(name, on_block)
            layer.stats.update(feats, labels, on_block=on_block, check=False)

    def update_ood(self, name: str, features: Tensor) -> None:
        """Add out-of-distribution features (n', D) of layer ``name``: its ``nc5``
        (Ammar et al., ICLR 2024) needs only their mean, at any time before :meth:`result`."""
        layer = self.layers[name]
        if layer.ood is None:
            layer.ood = _sums_only(1, features.shape[1], self.device)
        zeros = torch.zeros(features.shape[0], dtype=torch.long, device=self.device)
        layer.ood.update(features, zeros, check=False)

    def end_pass(self) -> None:
        """Close a pass (summed over processes when ``sync``): after the first, set up
        the second; after the second, check that it read as many samples."""
        if self.sync:
            self._agree_on_widths()
        first = next(iter(self.layers.values())).stats
        local_counts = None if first is None else first.counts.clone()  # before summing
        del first  # not held through the next pass's setup
        for layer in self.layers.values():
            if layer.stats is None:
                raise ValueError(f"{self._empty()} (no {self._part(plural=True)})")
            if self.sync:
                layer.stats.all_reduce(self.group)
        if self.passes_done == 0:
            self._between_passes()
            if self.ncc_samples is not None:
                self.sampler = self._sampler(local_counts)
        else:
            self._close_second()
        self.passes_done += 1

    def class_means(self, name: str | None = None) -> Tensor:
        """(C', D) float64 class means of the classes measured: the first pass's, after
        the second the second's (the same to rounding; what ``measure_chunks`` returns)."""
        layer = self._layer(name)
        if self.passes_done < 2 or layer.stats is None:
            return layer.means
        return layer.stats.class_means()

    # ----------------------------------------------------------------- between the passes
    def _start(self, layer: Layer, dim: int) -> None:
        layer.stats = _sums_only(self.num_classes, dim, self.device)

    def _between_passes(self) -> None:
        """The first pass's checks, class means and eigenpairs, the second pass's basis."""
        first = next(iter(self.layers.values())).stats
        assert first is not None
        if first.num_samples == 0:
            raise ValueError(f"{self._empty()} (no samples in any {self._part()})")
        for layer in self.layers.values():
            assert layer.stats is not None
            if not bool(torch.isfinite(layer.stats.sums).all()):
                what = "features" if self.source == "chunks" else "activations"
                raise ValueError(f"{what} contain NaN or Inf values")
        kept = self._kept_classes(first.counts)
        del first
        for layer in self.layers.values():
            self._second_setup(layer, kept)

    def _kept_classes(self, counts: Tensor) -> Tensor | None:
        """The classes measured when some are left out (empty with ``drop_empty``, or
        filtered by ``min_count`` / ``top_k``), else None."""
        if self.min_count > 1 or self.top_k is not None:
            return self._filtered(counts)
        empty = torch.nonzero(counts == 0).flatten().cpu()
        if not empty.numel():
            return None
        if not self.drop_empty:
            names = [int(self.class_ids[i]) for i in empty]
            shown = ", ".join(map(str, names[:20])) + (", ..." if len(names) > 20 else "")
            raise ValueError(
                f"labels: class {names[0]} has no samples ({len(names)} of "
                f"{self.num_classes} classes are empty: {shown}); drop_empty=True measures "
                "the others")
        kept = torch.nonzero(counts.cpu() > 0).flatten()
        if kept.numel() < 2:
            raise ValueError(f"labels: only {kept.numel()} class has samples; need 2")
        return self._keep(kept)

    def _filtered(self, counts: Tensor) -> Tensor | None:
        """The classes of at least ``min_count`` samples, the ``top_k`` most frequent."""
        kept = vocab.frequent_classes(counts.cpu(), self.min_count, self.top_k)
        if kept.numel() < 2:
            raise ValueError(f"labels: only {kept.numel()} class(es) have at least "
                             f"min_count = {self.min_count} samples; need 2")
        if kept.numel() == self.num_classes:
            return None
        return self._keep(kept)

    def _keep(self, kept: Tensor) -> Tensor:
        self.remap = torch.full((self.num_classes,), -1, dtype=torch.long)
        self.remap[kept] = torch.arange(kept.numel())
        self.class_ids = self.class_ids[kept]
        return kept

    def _sampler(self, local_counts: Tensor | None) -> _Sampler:
        """NC4's sample: this process's share of ``ncc_samples``, in proportion to its
        samples of the classes measured."""
        assert self.ncc_samples is not None
        first = next(iter(self.layers.values())).first_counts  # the first pass's, summed
        assert first is not None
        measured = (torch.ones_like(first, dtype=torch.bool) if self.remap is None
                    else self.remap.to(first.device) >= 0)
        local = 0 if local_counts is None else int(local_counts[measured].sum())
        total = int(first[measured].sum())
        share = min(local, round(self.ncc_samples * local / total)) if total else 0
        return _Sampler(local, share)

    def _second_setup(self, layer: Layer, kept: Tensor | None) -> None:
        """Class means, mu_G and Sigma_B's eigenpairs; the second pass's ClassStats (in
        Sigma_B's eigenbasis when 0 < r < D/2 and no MSE terms) and NC4 tally."""
        assert layer.stats is not None
        first, dim = layer.stats, layer.stats.dim
        pick = (lambda t: t) if kept is None else (lambda t: t[kept.to(t.device)])
        # the first pass's sums are dropped once the means are taken (their counts are
        # what the second pass is checked against): memory holds C x D float64 a few times
        layer.first_counts, layer.means = first.counts, pick(first.class_means())
        if self.global_mean == "classes":
            layer.centre = layer.means.mean(0)
        elif kept is None:
            layer.centre = first.global_mean()
        else:  # the mean of the samples measured: the left-out classes' are not
            counts = pick(first.counts).to(layer.means.dtype)
            layer.centre = counts @ layer.means / counts.sum()
        layer.stats = None
        del first
        deciding, classifier_ids = (layer.weight, layer.bias), None
        if layer.weight is not None and kept is not None:
            if self.argmax_all:  # all C rows decide; their ids mapped to the measured
                classifier_ids = self.remap
            layer.weight, layer.bias = pick(layer.weight), pick(layer.bias)
            if not self.argmax_all:
                deciding = (layer.weight, layer.bias)
        if layer.class_means is not None and kept is not None:
            layer.class_means = pick(layer.class_means)
        eigvals, eigvecs = functional.between_class_eig(layer.means - layer.centre)
        layer.eig = (eigvals, eigvecs)
        in_span = 0 < eigvecs.shape[1] < dim // 2 and layer.mse is None
        basis = eigvecs if in_span else None
        layer.stats = ClassStats(layer.means.shape[0], dim, shift=layer.means, basis=basis,
                                 device=layer.means.device)
        layer.means = layer.stats.shift  # the same values: one (C, D) copy held, not two
        layer.tally = DecisionTally(*deciding, layer.means, layer.centre,
                                    layer.class_means, basis, classifier_ids)

    def _close_second(self) -> None:
        for layer in self.layers.values():
            assert layer.stats is not None and layer.first_counts is not None
            first = layer.first_counts.to(layer.stats.counts.dtype)
            ids = torch.arange(first.numel(), device=first.device)
            if self.remap is not None:  # the second pass counts the measured classes only
                remap = self.remap.to(first.device)
                kept = torch.nonzero(remap >= 0).flatten()
                first = torch.zeros_like(layer.stats.counts).index_copy(0, remap[kept],
                                                                         first[kept])
                ids = torch.zeros_like(kept).index_copy(0, remap[kept], kept)
            check_pass_rows(int(first.sum()), layer.stats.num_samples, self.source)
            check_pass_classes(first, layer.stats.counts, ids, self.source)
            if layer.tally is not None:
                layer.tally.release()  # its counts are all that is read from now on
            if self.sync and layer.tally is not None:
                dist.all_reduce(layer.tally.tallied, op=dist.ReduceOp.SUM, group=self.group)
        if self.sync and self.sampler is not None:
            dist.all_reduce(self.sampler.taken, op=dist.ReduceOp.SUM, group=self.group)

    def _agree_on_widths(self) -> None:
        """A process whose shard was empty learns each layer's width from the others, so
        that every process joins the same all_reduce calls."""
        widths = torch.tensor([layer.dim for layer in self.layers.values()],
                              dtype=torch.int64, device=self.device)
        dist.all_reduce(widths, op=dist.ReduceOp.MAX, group=self.group)
        for layer, width in zip(self.layers.values(), widths.tolist(), strict=True):
            if layer.stats is None and width > 0:
                self._start(layer, width)

    def _empty(self) -> str:
        return "features is empty" if self.source == "chunks" else f"{self.source} is empty"

    def _part(self, plural: bool = False) -> str:
        if self.source == "chunks":
            return "chunks" if plural else "chunk"
        return "batches" if plural else "batch"

    def _layer(self, name: str | None) -> Layer:
        return self.layers[name] if name is not None else next(iter(self.layers.values()))

    # ----------------------------------------------------------------- the metrics
    def result(self, name: str | None = None) -> dict[str, float]:
        """The metrics of layer ``name`` (default: the first): the defined METRIC_KEYS then
        BEYOND_KEYS (docs/metrics.md), NaN with a warning for an undefined one."""
        layer = self._layer(name)
        assert layer.stats is not None and layer.eig is not None
        result = class_metrics(layer.stats, layer.weight, layer.centre, layer.eig,
                               cdnv_power=self.cdnv_power,
                               etf_without_simplex=self.etf_without_simplex,
                               pair_dtype=self.pair_dtype)
        if layer.tally is not None:
            total = (float(layer.stats.counts.sum()) if self.sampler is None
                     else float(self.sampler.taken))
            if total > 0:
                result.update(nc4_metrics(layer.tally, total, layer.weight is not None))
        if layer.wants_ood:  # centred on mu_G (translation-invariant), and as NECO has it
            ood_mean = self._ood_mean(layer)
            result["nc5"] = functional.nc5(layer.means - layer.centre, ood_mean - layer.centre)
            result["nc5_uncentred"] = functional.nc5(layer.means, ood_mean)
        if layer.mse is not None and layer.weight is not None and layer.bias is not None:
            second = layer.stats
            result.update(functional.mse_decomposition(
                layer.weight, layer.bias, second.class_means(), second.counts,
                second.within_class_cov(), float(layer.mse)))
        ordered = {k: result[k] for k in (*METRIC_KEYS, *BEYOND_KEYS) if k in result}
        no_simplex = not (self.etf_without_simplex or simplex_exists(*layer.means.shape))
        undefined_to_nan(ordered, means_coincide=layer.eig[0].numel() == 0,
                         no_simplex=no_simplex)
        if self.filters:
            ordered["classes_measured"] = float(layer.means.shape[0])
        if self.sampler is not None:
            ordered["ncc_samples"] = float(self.sampler.taken)
        return ordered

    def _ood_mean(self, layer: Layer) -> Tensor:
        """(D,) mean of the OOD features (summed over processes when ``sync``, once)."""
        if layer.ood is None:  # none on this process
            layer.ood = _sums_only(1, layer.dim, self.device)
        if self.sync and not layer.ood_reduced:
            layer.ood.all_reduce(self.group)
            layer.ood_reduced = True
        if layer.ood.num_samples == 0:
            raise ValueError(f"{self.ood_source} is empty")
        return layer.ood.global_mean()

    def results(self) -> dict[str, dict[str, float]]:
        """{layer: :meth:`result`} in the order of ``layers``."""
        return {name: self.result(name) for name in self.layers}


def simplex_exists(num_classes: int, dim: int) -> bool:
    """Whether C vectors in D dimensions can form a simplex ETF (C <= D + 1)."""
    return num_classes <= dim + 1


def class_metrics(stats: ClassStats, weight: Tensor | None, centre: Tensor,
                  eig: tuple[Tensor, Tensor] | None = None, *,
                  cdnv_power: int = 1, etf_without_simplex: bool = True,
                  pair_dtype: torch.dtype = F64) -> dict[str, float]:
    """NC1-NC3 and the class-statistics metrics of docs/metrics.md "Beyond the paper".

    NC1 = Tr(Sigma_W Sigma_B^+) / C (Papyan et al. 2020) is read along Sigma_B's
    eigenvectors, so only Sigma_W's variances along them are needed (the second pass's
    basis holds exactly these). Separation fuzziness (He & Su 2023), generalised NC2 (Liu
    et al. 2023), NC3 (Wu & Papyan 2024) and Zhu et al.'s (2021) self-duality follow.

    Args:
        stats: statistics of all samples, every class non-empty (second-pass moments),
            with Sigma_W whole or kept in the basis ``eig``'s eigenvectors themselves.
        weight: (C, D) float64 classifier rows, or None (the classifier-free keys only).
        centre: (D,) the global mean mu_G the class means are centred on.
        eig: Sigma_B's eigenpairs ((r,), (D, r)) if already known.
        cdnv_power: the power of the class distance in CDNV (:func:`vocab.cdnv`).
        etf_without_simplex: False: with C > D + 1 the ``ETF_KEYS`` are NaN (no simplex
            ETF exists) and are not computed (their C x C pairs are a vocabulary's cost).
        pair_dtype: of the tiles of GNC2 and CDNV's C^2 / 2 pairs (float64, or float32:
            :func:`functional.pair_statistics`).
    """
    centred = stats.class_means().sub_(centre)  # the means themselves are not kept
    eigvals, eigvecs = eig if eig is not None else functional.between_class_eig(centred)
    within = stats.within_class_cov()  # (D, D), or (r, r) in the basis V itself
    # v_k^T Sigma_W v_k for each eigenvector v_k: the diagonal when Sigma_W is kept in V
    along = (torch.diagonal(within).clone() if stats.basis is not None
             else ((within @ eigvecs) * eigvecs).sum(0))
    simplex = etf_without_simplex or simplex_exists(*centred.shape)
    geometry = functional.simplex_geometry(centred) if simplex else _no_simplex()
    # GNC2 and CDNV of the means from one pass over their pairs (CDNV is translation
    # invariant: the means centred on mu_G serve it as well as on their own mean)
    pairs = functional.pair_statistics(centred, stats.class_variances(), cdnv_power,
                                       pair_dtype)
    result = {
        "nc1": functional.nc1(along, eigvals, stats.num_classes),
        "nc1_ratio": functional.nc1_ratio(stats.within_class_trace(), centred),
        "cdnv": pairs["cdnv"],
        "equinorm_means": functional.equinorm(centred),
        "equiangular_means": geometry["equiangular"], "maxangle_means": geometry["maxangle"],
        "etf_means": geometry["etf"],
        "separation_fuzziness": functional.separation_fuzziness(  # translation-invariant
            within, stats.basis, centred, stats.counts),
        "gnc2_means": pairs["variance"], "gnc2_energy_means": pairs["energy"],
    }
    if weight is not None:
        result.update(_classifier_metrics(weight.to(stats.device, F64), centred, simplex,
                                          pair_dtype))
    return result


def _no_simplex() -> dict[str, float]:
    return {"equiangular": math.nan, "maxangle": math.nan, "etf": math.nan}


def _classifier_metrics(weight: Tensor, centred: Tensor, simplex: bool,
                        pair_dtype: torch.dtype = F64) -> dict[str, float]:
    """NC2 of the classifier rows and NC3 (self-duality) with the centred means (C, D);
    the ``ETF_KEYS`` NaN unless ``simplex``; GNC2's tiles in ``pair_dtype``."""
    geometry = functional.simplex_geometry(weight) if simplex else _no_simplex()
    gnc2 = functional.gnc2(weight, pair_dtype)
    return {
        "equinorm_weights": functional.equinorm(weight),
        "equiangular_weights": geometry["equiangular"],
        "maxangle_weights": geometry["maxangle"], "etf_weights": geometry["etf"],
        "self_duality": functional.self_duality(weight, centred),
        "gnc2_weights": gnc2["variance"], "gnc2_energy_weights": gnc2["energy"],
        **functional.duality(weight, centred),
        "self_duality_etf": (functional.self_duality_etf(weight, centred) if simplex
                             else math.nan),
    }


def nc4_metrics(tally: DecisionTally, total: float, with_classifier: bool) -> dict[str, float]:
    """NC4 (Papyan et al. 2020, Fig. 7) as shares of the ``total`` samples tallied: the
    classifier's disagreement with the NCC rule and accuracy (with a classifier), the NCC
    accuracy."""
    disagree, right, ncc_right = (float(c) / total for c in tally.counts)
    result = {"ncc_accuracy": ncc_right}
    if with_classifier:
        result.update(ncc_mismatch=disagree, accuracy=right)
    return result


def undefined_to_nan(result: dict[str, float], means_coincide: bool,
                     no_simplex: bool = False) -> None:
    """Non-finite values become NaN, each with a warning saying why (never a crash);
    ``no_simplex``: C > D + 1, the ``ETF_KEYS`` are NaN for that reason."""
    reasons = (
        (no_simplex, ETF_KEYS, "C > D + 1: no simplex ETF of C vectors exists in D "
         "dimensions, so {} are NaN; read gnc2_*, unc3 and cdnv instead (Wu & Papyan 2024)"),
        (means_coincide, _MEANS_KEYS, "all class means coincide: NC1, NC2 and NC3 of the "
         "means undefined (NaN: {})"),
    )
    for applies, keys, message in reasons:
        if applies:
            hit = [k for k in keys if k in result]
            for key in hit:
                result[key] = math.nan
            warnings.warn(message.format(", ".join(hit)), RuntimeWarning, stacklevel=5)
    bad = [k for k, v in result.items()
           if not math.isfinite(v) and not (means_coincide and k in _MEANS_KEYS)
           and not (no_simplex and k in ETF_KEYS)]
    for key in bad:
        result[key] = math.nan
    if bad:
        warnings.warn(
            f"{', '.join(bad)} undefined for these data (NaN): a zero class-mean or "
            "classifier vector, two coinciding class means or directions, or no spread",
            RuntimeWarning, stacklevel=5)


class ReferenceMeans:
    """The rule that the training split's class means serve the later splits' NC4
    (docs/metrics.md, "On other data"): measure ``train`` first, :meth:`keep` its means,
    and take :meth:`for_split` as each split's ``class_means``.

    Args:
        num_classes: C of the full label set; with ``classes`` measured, the kept means
            are laid out as (C, D) rows (zero elsewhere), as ``measure_chunks`` takes them.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self.means: Tensor | None = None

    def for_split(self, split: str) -> Tensor | None:
        """The class means NC4 of ``split`` uses: None (its own) for the training split."""
        return None if split == TRAIN_SPLIT else self.means

    def keep(self, split: str, means: Tensor, classes: list[int] | None = None) -> None:
        """Remember ``means`` (C', D) when ``split`` is the training split; ``classes``:
        the C' class ids they belong to when a subset was measured."""
        if split != TRAIN_SPLIT:
            return
        if classes is not None and self.num_classes is not None:
            full = means.new_zeros(self.num_classes, means.shape[1])
            full[classes] = means
            means = full
        self.means = means


class _Sampler:
    """NC4's sample of the second pass: ``take`` of this process's ``rows`` samples,
    evenly spaced (row i is taken when floor((i + 1) k / n) > floor(i k / n)), so the
    choice depends on the order of the samples only, not on how they are chunked."""

    def __init__(self, rows: int, take: int) -> None:
        self.rows, self.take = rows, take
        self.seen: dict[str, int] = {}
        self.taken = torch.zeros((), dtype=torch.int64)

    def wrap(self, name: str, on_block: Callable[..., None]) -> Callable[..., None]:
        """``on_block`` of layer ``name`` called with the sampled rows of each block only."""
        first = not self.seen or name == next(iter(self.seen))

        def sampled(labels: Tensor | int, h: Tensor, x: Tensor,
                    projected: Tensor | None = None, x_sq: Tensor | None = None) -> None:
            start = self.seen.get(name, 0)
            index = torch.arange(start, start + h.shape[0], device=h.device)
            self.seen[name] = start + h.shape[0]
            pick = (index + 1) * self.take // max(self.rows, 1) > index * self.take // max(
                self.rows, 1)
            if first:
                self.taken += int(pick.sum())
            if not bool(pick.any()):
                return
            y = labels if isinstance(labels, int) else labels[pick.to(labels.device)]
            on_block(y, h[pick], x[pick.to(x.device)],
                     None if projected is None else projected[pick.to(projected.device)],
                     None if x_sq is None else x_sq[pick.to(x_sq.device)])

        return sampled


def _sums_only(num_classes: int, dim: int, device: torch.device) -> ClassStats:
    """Counts and sums only (a basis of width 0): the means, in one cheap pass."""
    no_basis = torch.zeros(dim, 0, dtype=F64, device=device)
    return ClassStats(num_classes, dim, basis=no_basis, device=device)
