"""Token-level measurement of language models: `measure_language_model` streams the token
samples of tiny float64 GPT-2 and BERT models through the engine and equals
`nctools.measure` on the flattened samples built by hand (padding and -100 excluded);
`NCMetric` over (B, T, D) chunks equals `measure` on the flattened tokens; layer by layer,
each hidden state's numbers equal `measure` on its own hand-built token samples."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

import nctools
from nctools.analysis.lm_measure import measure_language_model
from nctools.metrics.engine import CLASSIFIER_FREE_KEYS
from nctools.metrics.ncmetric import NCMetric
from nctools.models.tokens import IGNORE_INDEX, lm_layer_names
from tests.helpers import hand_token_samples, lm_batches

VOCAB, WIDTH = 60, 16


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double().eval()


@pytest.fixture(scope="module")
def bert() -> BertForMaskedLM:
    torch.manual_seed(1)
    config = BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    return BertForMaskedLM(config).double().eval()


def _batches(masked: bool, count: int = 4) -> list[dict[str, torch.Tensor]]:
    return lm_batches(VOCAB, masked, count)


def _flattened(model, batches, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return hand_token_samples(model, batches, causal)


def _assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key


@pytest.mark.parametrize("options", [
    {}, {"min_count": 3, "global_mean": "classes", "cdnv_power": 2}, {"top_k": 10},
])
@pytest.mark.filterwarnings("ignore:C > D")
def test_causal_lm_equals_measure_on_its_token_samples(gpt2, options) -> None:
    batches = _batches(masked=False)
    features, labels = _flattened(gpt2, batches, causal=True)
    assert features.shape[0] == 4 * (11 + 8 + 4 - 1)  # padding and -100 excluded
    weight = gpt2.lm_head.weight
    want = nctools.measure(features, labels, weight.detach(), drop_empty=True,
                           argmax_all_classes=True, etf_without_simplex=False,
                           pair_precision="float32", **options)
    got = measure_language_model(gpt2, batches, **options)
    _assert_same(got, want)
    assert got["classes_measured"] < VOCAB  # tokens never predicted are not classes
    # the float32 tiles of the token pairs (the default) against float64 throughout
    exact = measure_language_model(gpt2, batches, pair_precision="float64", **options)
    for key in ("gnc2_means", "gnc2_energy_means", "gnc2_weights", "cdnv"):
        assert got[key] == pytest.approx(exact[key], rel=1e-6), key
        assert got[key] != exact[key], key  # float32 rounding shows: the option is heard


@pytest.mark.filterwarnings("ignore:C > D")
def test_masked_lm_equals_measure_on_its_masked_tokens(bert) -> None:
    batches = _batches(masked=True)
    features, labels = _flattened(bert, batches, causal=False)
    decoder = bert.cls.predictions.decoder
    want = nctools.measure(features, labels, decoder.weight.detach(), decoder.bias.detach(),
                           drop_empty=True, argmax_all_classes=True, etf_without_simplex=False,
                           ncc_samples=20, pair_precision="float32")
    got = measure_language_model(bert, lambda: iter(batches), ncc_samples=20)
    _assert_same(got, want)
    assert got["ncc_samples"] == 20


def test_the_model_s_own_argmax_over_the_vocabulary_is_the_classifier(gpt2) -> None:
    batches = _batches(masked=False, count=2)
    features, labels = _flattened(gpt2, batches, causal=True)
    got = measure_language_model(gpt2, batches, min_count=2)
    logits = features @ gpt2.lm_head.weight.detach().T  # the model's own scores
    counts = torch.bincount(labels, minlength=VOCAB)
    kept = counts >= 2
    keep = kept[labels]
    accuracy = (logits[keep].argmax(1) == labels[keep]).double().mean()
    assert got["accuracy"] == pytest.approx(float(accuracy), abs=1e-15)


def test_an_iterator_or_a_classifier_is_refused(gpt2) -> None:
    with pytest.raises(ValueError, match=r"^batches: an iterator can be read only once"):
        measure_language_model(gpt2, iter(_batches(masked=False)))
    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=1, intermediate_size=8)
    with pytest.raises(ValueError, match=r"^model: BertForSequenceClassification is not a"):
        measure_language_model(BertForSequenceClassification(config), _batches(False))


def test_ncmetric_over_token_chunks_equals_measure_on_the_flattened_tokens() -> None:
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(6, 3, 10, 8, generator=gen, dtype=torch.float64)  # 6 chunks
    labels = torch.randint(0, 5, (6, 3, 10), generator=gen)
    features += 3 * torch.nn.functional.one_hot(labels, 8).double()  # classes apart
    labels[:, 1, 7:] = IGNORE_INDEX  # padding
    labels[:, 0, 0] = IGNORE_INDEX
    weight = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    metric = NCMetric(5, weight, keep_features=True)
    for chunk, chunk_labels in zip(features, labels, strict=True):
        metric.update(chunk, chunk_labels)
    got = {k: float(v) for k, v in metric.compute().items()}
    keep = labels != IGNORE_INDEX
    want = nctools.measure(features[keep], labels[keep], weight)
    for key, value in got.items():
        assert value == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    with pytest.raises(ValueError, match=r"^labels has shape \(3, 9\) but features has shape"):
        metric.update(features[0], labels[0, :, :9])


def _hand_layer_samples(model, batches, causal: bool, state: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    return hand_token_samples(model, batches, causal, state=state)


def _inner(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items()
            if k in (*CLASSIFIER_FREE_KEYS, "classes_measured", "ncc_samples")}


LAYER_OPTIONS = [{}, {"min_count": 3, "global_mean": "classes", "cdnv_power": 2},
                 {"top_k": 10, "ncc_samples": 25}]


@pytest.mark.parametrize("options", LAYER_OPTIONS)
@pytest.mark.filterwarnings("ignore:C > D")
@pytest.mark.filterwarnings("ignore:gnc2_means, gnc2_energy_means undefined")
def test_every_hidden_state_equals_measure_on_its_own_token_samples(gpt2, options) -> None:
    batches = _batches(masked=False)
    got = measure_language_model(gpt2, batches, layers="all", **options)
    # GPT-2 returns its last hidden state after ln_f: the LM head's input
    assert list(got) == lm_layer_names(gpt2) == ["embeddings", "block.1", "lm_head"]
    common = dict(drop_empty=True, argmax_all_classes=True, etf_without_simplex=False,
                  pair_precision="float32")  # the language-model default
    kept = None
    for state, name in enumerate(got):
        features, labels = _hand_layer_samples(gpt2, batches, causal=True, state=state)
        if name == "lm_head":
            want = nctools.measure(features, labels, gpt2.lm_head.weight.detach(),
                                   **common, **options)
        else:
            want = _inner(nctools.measure(features, labels, num_classes=VOCAB,
                                          **common, **options))
        _assert_same(got[name], want)
        kept = kept or got[name]["classes_measured"]
        assert got[name]["classes_measured"] == kept  # the same tokens at every layer
    # the last layer is the single-layer measurement
    _assert_same(got["lm_head"], measure_language_model(gpt2, batches, **options))


@pytest.mark.filterwarnings("ignore:C > D")
def test_a_masked_lm_s_head_input_follows_its_last_block(bert) -> None:
    batches = _batches(masked=True)
    got = measure_language_model(bert, batches, layers="blocks", min_count=2)
    # BERT's head transforms its last hidden state: both are measured
    assert list(got) == ["embeddings", "block.1", "block.2", "lm_head"]
    for state, name in enumerate(["embeddings", "block.1", "block.2"]):
        features, labels = _hand_layer_samples(bert, batches, causal=False, state=state)
        want = nctools.measure(features, labels, num_classes=VOCAB, drop_empty=True,
                               argmax_all_classes=True, etf_without_simplex=False, min_count=2,
                               pair_precision="float32")
        _assert_same(got[name], _inner(want))
    _assert_same(got["lm_head"], measure_language_model(bert, batches, min_count=2))


@pytest.mark.filterwarnings("ignore:C > D")
def test_named_layers_are_measured_in_the_order_given(gpt2) -> None:
    batches = _batches(masked=False, count=2)
    every = measure_language_model(gpt2, batches, layers="all")
    some = measure_language_model(gpt2, batches, layers=["lm_head", "embeddings"])
    assert list(some) == ["lm_head", "embeddings"]
    for name in some:
        _assert_same(some[name], every[name])
    with pytest.raises(ValueError, match=r"^layers: 'block.7' is not a layer of the model; "
                                         r"its layers: embeddings, block.1, lm_head$"):
        measure_language_model(gpt2, batches, layers=["block.7"])
    with pytest.raises(ValueError, match=r"^layers: give 'all', 'blocks' or a list"):
        measure_language_model(gpt2, batches, layers="every")
    with pytest.raises(ValueError, match=r"^layers: give distinct layer names"):
        measure_language_model(gpt2, batches, layers=["lm_head", "lm_head"])


@pytest.mark.filterwarnings("ignore:C > D")
def test_measure_model_of_a_language_model_is_its_token_measurement(gpt2, bert) -> None:
    """nctools.measure_model routes a causal or masked LM to its token samples: the same
    numbers as measure_language_model, as {layer: metrics} and as a frame."""
    causal, masked = _batches(masked=False), _batches(masked=True)
    got = nctools.measure_model(gpt2, causal)
    assert list(got) == ["lm_head"]
    _assert_same(got["lm_head"], measure_language_model(gpt2, causal))
    every = nctools.measure_model(bert, masked, layers="blocks")
    want = measure_language_model(bert, masked, layers="blocks")
    assert list(every) == list(want) == ["embeddings", "block.1", "block.2", "lm_head"]
    for name in want:
        _assert_same(every[name], want[name])
    frame = nctools.measure_model(bert, masked, layers="blocks", as_frame=True)
    row = frame[(frame["layer"] == "lm_head") & (frame["metric"] == "unc3")].iloc[0]
    assert row["at"] == "input" and row["kind"] == "BertForMaskedLM"
    assert row["value"] == want["lm_head"]["unc3"]
    with pytest.raises(ValueError, match=r"^num_classes, pool: not for a language model"):
        nctools.measure_model(gpt2, causal, num_classes=7, pool="avg")
