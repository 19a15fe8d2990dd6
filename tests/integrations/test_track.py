"""nctools.track: the metrics of a plain loop's forward passes equal nctools.measure on
the same features taken without a hook; a language model's, nctools.measure on its token
samples built by hand."""

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

import nctools
from nctools import measure
from nctools.integrations.track import TokenTracker
from tests.helpers import hand_token_samples, lm_batches, make_net

VOCAB = 50


def batches(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen)
    y = torch.arange(n) % 3
    x += y[:, None, None, None] * 0.5  # classes apart
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)], x, y


def test_track_equals_measure_on_the_head_input():
    model = make_net(num_classes=3).eval()
    loader, x, y = batches()
    with torch.no_grad(), nctools.track(model, keep_features=True) as tracker:
        for xb, yb in loader:
            model(xb)
            tracker.update(yb)
    got = tracker.compute()
    with torch.no_grad():  # the head's input, by hand
        h = model.pool(model.block2(model.block1(x))).flatten(1)
    want = measure(h, y, model.head.weight.detach(), model.head.bias.detach())
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-10, abs=1e-12), key
    model(x)  # the hook is gone after the with block
    assert tracker.hook.value is None


def test_track_any_layer_and_bad_use():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    tracker = nctools.track(model, layer=model[1], num_classes=3)
    with torch.no_grad():
        model(x)
        tracker.update(y)
        h = model[0](x)
    tracker.remove()
    assert float(tracker.compute()["nc1"]) == pytest.approx(
        measure(h, y, torch.zeros(3, 5))["nc1"], rel=1e-10
    )
    with pytest.raises(ValueError, match="num_classes"):
        nctools.track(model, layer=model[1])
    with pytest.raises(ValueError, match="did not run"):
        nctools.track(model).update(y)


def test_track_names_the_empty_class_when_num_classes_is_too_large():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(30, 4), torch.arange(30) % 3  # classes 0, 1, 2 of 4
    with torch.no_grad(), nctools.track(model, num_classes=4) as tracker:
        model(x)
        tracker.update(y)
    with pytest.raises(ValueError, match=r"^track: class 3 of num_classes=4 has no samples "
                                         r"\(1 of 4 classes are empty\): num_classes may be "
                                         r"too large"):
        tracker.compute()


def test_track_takes_a_layer_by_name_and_names_one_that_did_not_run():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    by_name = nctools.track(model, layer="1", num_classes=3)
    by_module = nctools.track(model, layer=model[1], num_classes=3)
    with torch.no_grad():
        model(x)
    by_name.update(y)
    by_module.update(y)
    assert float(by_name.compute()["nc1"]) == float(by_module.compute()["nc1"])
    with pytest.raises(ValueError, match="layer '1' did not run"):
        by_name.update(y)
    with pytest.raises(ValueError, match="track: layer 'fc' is not a module of Sequential"):
        nctools.track(model, layer="fc", num_classes=3)


def _tracked(model, batches, **options):
    """Track ``model`` over ``batches``: a forward pass, then update(labels, mask)."""
    with torch.no_grad(), nctools.track(model, **options) as tracker:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tracker.update(batch["labels"], batch["attention_mask"])
    return tracker


def _assert_same(got, want):
    assert list(got) == list(want)
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(float(got[key])), key
        else:
            assert float(got[key]) == pytest.approx(value, rel=1e-10, abs=1e-12), key


@pytest.mark.parametrize("options", [{}, {"min_count": 2, "global_mean": "classes",
                                          "cdnv_power": 2, "ncc_samples": 30}])
@pytest.mark.filterwarnings("ignore:C > D")
def test_track_of_a_causal_lm_equals_measure_on_its_shifted_tokens(options):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32)
    model = GPT2LMHeadModel(config).double().eval()
    batches = lm_batches(VOCAB, masked=False)
    tracker = _tracked(model, batches, **options)
    assert isinstance(tracker, TokenTracker) and tracker.num_classes == VOCAB
    features, labels = hand_token_samples(model, batches, causal=True)
    assert features.shape[0] == 4 * (11 + 8 + 4 - 1) == sum(map(len, tracker.labels))
    want = measure(features, labels, model.lm_head.weight.detach(), drop_empty=True,
                   argmax_all_classes=True, etf_without_simplex=False,
                   pair_precision="float32", **options)  # the language-model default
    _assert_same(tracker.compute(), want)
    assert want["classes_measured"] < VOCAB
    model(input_ids=batches[0]["input_ids"])  # the hook is gone after the with block
    assert tracker.hook.value is None


@pytest.mark.filterwarnings("ignore:C > D")
def test_track_of_a_masked_lm_counts_only_the_masked_positions():
    torch.manual_seed(1)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    model = BertForMaskedLM(config).double().eval()
    batches = lm_batches(VOCAB, masked=True)
    tracker = _tracked(model, batches)
    masked = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert sum(map(len, tracker.labels)) == masked < 4 * (11 + 8 + 5)  # the masked ones only
    features, labels = hand_token_samples(model, batches, causal=False)
    decoder = model.cls.predictions.decoder
    want = measure(features, labels, decoder.weight.detach(), decoder.bias.detach(),
                   drop_empty=True, argmax_all_classes=True, etf_without_simplex=False,
                   pair_precision="float32")
    _assert_same(tracker.compute(), want)
    tracker.reset()
    with pytest.raises(ValueError, match="no batch yet"):
        tracker.compute()


def test_track_of_an_lm_names_what_is_wrong():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=VOCAB,
                                       n_positions=16)).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match=r"^track: keep_features not among the options of a "
                                         r"language model's token samples \(min_count, "):
        nctools.track(model, keep_features=True)
    with pytest.raises(ValueError, match=r"^track: num_classes=10, but a language model's "
                                         r"classes are its vocabulary \(50 tokens\)"):
        nctools.track(model, num_classes=10)
    with pytest.raises(ValueError, match=r"^min_count must be an integer >= 1, got 0"):
        nctools.track(model, min_count=0)
    with torch.no_grad(), nctools.track(model) as tracker:
        model(input_ids=ids)
        with pytest.raises(ValueError, match=r"^labels: shape \(2, 5\), but the last forward "
                                             r"pass had \(B, T\) = \(2, 6\) token positions"):
            tracker.update(ids[:, :5])
    assert isinstance(nctools.track(model, layer="lm_head"), TokenTracker)  # the LM head
    # another layer than the LM head: measured as a classifier's input, as for any model
    assert not isinstance(nctools.track(model, layer="transformer.ln_f", num_classes=VOCAB),
                          TokenTracker)
