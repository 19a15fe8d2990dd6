"""Token-level measurement of language models: `measure_language_model` streams the token
samples of tiny float64 GPT-2 and BERT models through the engine and equals
`nctools.measure` on the flattened samples built by hand (padding and -100 excluded);
`NCMetric` over (B, T, D) chunks equals `measure` on the flattened tokens."""

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
from nctools.metrics.ncmetric import NCMetric
from nctools.models.tokens import IGNORE_INDEX

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
    """Right-padded batches (B = 3, T = 12), tokens from a small Zipf-like alphabet so that
    classes repeat; some labels -100; a masked LM's labels on a random 40% of positions."""
    gen = torch.Generator().manual_seed(3)
    weights = 1.0 / torch.arange(1, VOCAB, dtype=torch.float64)  # not 0: BERT's zero pad row
    out = []
    for _ in range(count):
        ids = 1 + torch.multinomial(weights, 36, replacement=True, generator=gen).view(3, 12)
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[1, 9:] = 0
        mask[2, 5:] = 0
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        labels[0, 3] = IGNORE_INDEX
        if masked:
            chosen = torch.rand(3, 12, generator=gen) < 0.4
            labels = labels.masked_fill(~chosen, IGNORE_INDEX)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _flattened(model, batches, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The (features, labels) pairs of the model's loss, by hand from its hidden states."""
    feats, labs = [], []
    for batch in batches:
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states[-1]
        if not causal:  # BERT's head has a transform before the decoder: its input
            hidden = model.cls.predictions.transform(hidden)
        mask, labels = batch["attention_mask"], batch["labels"]
        for b in range(labels.shape[0]):
            for t in range(labels.shape[1] - 1 if causal else labels.shape[1]):
                label = labels[b, t + 1] if causal else labels[b, t]
                real = mask[b, t] and (mask[b, t + 1] if causal else True)
                if real and label != IGNORE_INDEX:
                    feats.append(hidden[b, t])
                    labs.append(int(label))
    return torch.stack(feats), torch.tensor(labs)


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
