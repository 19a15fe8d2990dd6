"""The Hugging Face callback, passed as ``Trainer(callbacks=[...])``, logs nctools.measure's
numbers of independently extracted features into the Trainer's log history and its
report_to loggers, and never changes what the Trainer itself logs; a language model's are
those of measure_language_model on the same batches."""

import math
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from nctools import measure
from nctools.analysis.lm_measure import measure_language_model
from nctools.integrations.hf import NeuralCollapseCallback
from tests.helpers import Tokens, lm_batches, tiny_bert

NUM_CLASSES = 3
TIMED = ("_runtime", "_per_second", "flos")  # wall-clock keys: differ between any two runs


def arguments(tmp_path, **kwargs):
    """48 training rows in batches of 8: 6 steps an epoch."""
    settings = dict(
        output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=8,
        per_device_eval_batch_size=16, learning_rate=1e-3, use_cpu=True, report_to=[],
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        seed=0,
    )  # fmt: skip
    return TrainingArguments(**{**settings, **kwargs})


def fit(tmp_path, callbacks=None, model=None, train=None, evaluated=True, **kwargs):
    torch.manual_seed(0)
    model = tiny_bert(NUM_CLASSES) if model is None else model
    trainer = Trainer(model=model, args=arguments(tmp_path, **kwargs),
                      train_dataset=Tokens(48, 1) if train is None else train,
                      eval_dataset=Tokens(21, 2) if evaluated else None, callbacks=callbacks)
    trainer.train()
    return trainer, model


def untimed(rows):
    return [{k: v for k, v in row.items() if not k.endswith(TIMED)} for row in rows]


def nc_rows(trainer):
    return [row for row in trainer.state.log_history
            if any(key.startswith(("nc/", "eval_nc/")) for key in row)]


def test_logged_values_equal_measure_on_independent_features(tmp_path):
    trainer, model = fit(tmp_path, [NeuralCollapseCallback(layer="classifier")],
                         eval_strategy="epoch")
    rows = nc_rows(trainer)
    # epoch 1: the train split at its end, the eval split at the evaluation that makes its
    # loader; epoch 2: both at its end (each split measured once per step)
    assert [(row["epoch"], "nc/nc1" in row, "eval_nc/nc1" in row) for row in rows] == [
        (1.0, True, False), (1.0, False, True), (2.0, True, True)]
    train, val = Tokens(48, 1), Tokens(21, 2)
    model.eval()
    with torch.no_grad():  # the head's input: BERT's pooled output (dropout off in eval)
        h = model.bert(input_ids=train.ids).pooler_output
        h_val = model.bert(input_ids=val.ids).pooler_output
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    means = torch.stack([h[train.labels == c].mean(0) for c in range(NUM_CLASSES)])
    want = {"nc/": measure(h, train.labels, weight, bias),
            "eval_nc/": measure(h_val, val.labels, weight, bias, class_means=means)}
    final = rows[-1]
    for prefix, values in want.items():
        for key, value in values.items():
            assert final[prefix + key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("strategy", ["epoch", "steps"])
def test_trainer_log_history_is_unchanged_apart_from_the_nc_rows(tmp_path, strategy):
    kwargs = dict(logging_strategy=strategy, logging_steps=2, eval_strategy="epoch")
    alone, _ = fit(tmp_path / "alone", **kwargs)
    measured, _ = fit(tmp_path / "measured", [NeuralCollapseCallback(every_n_steps=3)], **kwargs)
    ours = nc_rows(measured)
    theirs = [row for row in measured.state.log_history if row not in ours]
    # the measurement runs in eval mode, without gradients, and leaves torch's generator
    # as it found it: the Trainer's rows are the same, loss for loss (timings aside)
    assert untimed(theirs) == untimed(alone.state.log_history)
    assert any("loss" in row and "grad_norm" in row for row in theirs)
    assert [row["step"] for row in ours if "nc/nc1" in row] == [3, 6, 9, 12]


def test_tensorboard_has_the_trainer_scalars_and_ours_under_train_and_eval(tmp_path):
    trainer, _ = fit(tmp_path, [NeuralCollapseCallback()], report_to=["tensorboard"],
                     logging_strategy="epoch", eval_strategy="epoch")
    (event_file,) = (tmp_path / "out").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "eval/loss",
            "train/nc/nc1", "eval/nc/nc1"} <= tags
    assert not [tag for tag in tags if "nc/eval" in tag or "nc/train" in tag]
    curve = events.Scalars("eval/nc/nc1")
    logged = [row["eval_nc/nc1"] for row in nc_rows(trainer) if "eval_nc/nc1" in row]
    assert [point.step for point in curve] == [6, 12]
    assert [point.value for point in curve] == pytest.approx(logged, rel=1e-6)


def test_a_run_shorter_than_an_epoch_is_measured_at_its_evaluations_not_as_epoch_0(tmp_path):
    trainer, _ = fit(tmp_path, [NeuralCollapseCallback()], max_steps=4, eval_strategy="steps",
                     eval_steps=2)
    rows = nc_rows(trainer)
    assert [(row["step"], round(row["epoch"], 4)) for row in rows] == [(2, 0.3333), (4, 0.6667)]
    assert all("nc/nc1" in row and "eval_nc/nc1" in row for row in rows)  # both splits
    quiet, _ = fit(tmp_path / "quiet", [NeuralCollapseCallback()], max_steps=4)
    assert nc_rows(quiet) == []  # no complete epoch, no evaluation: nothing called epoch 0


def test_added_twice_logs_each_row_once_and_warns(tmp_path):
    once, _ = fit(tmp_path / "once", [NeuralCollapseCallback()])
    callback = NeuralCollapseCallback()
    with pytest.warns(UserWarning, match="added 2 times"):
        twice, _ = fit(tmp_path / "twice", [NeuralCollapseCallback(), callback])
    assert len(nc_rows(twice)) == len(nc_rows(once)) == 2
    with pytest.warns(UserWarning, match="added 2 times"):
        same, _ = fit(tmp_path / "same", [callback, callback])
    assert len(nc_rows(same)) == 2


class Rows(torch.utils.data.Dataset):
    """The rows of dict batches, one item each, as a Trainer's dataset gives them."""

    def __init__(self, batches) -> None:
        self.items = [{key: value[i] for key, value in batch.items()}
                      for batch in batches for i in range(len(batch["input_ids"]))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


VOCAB = 50
LM_OPTIONS = {"min_count": 2, "global_mean": "classes", "cdnv_power": 2}


def tiny_lm(masked: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if masked:
        return BertForMaskedLM(BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16))
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB,
                                      n_positions=32))


def fit_lm(tmp_path, masked, callbacks):
    """Two epochs of 4 steps on 24 rows (batches of 6), evaluated at each epoch's end on
    12 rows in the eval loader's batches of 3 (those of ``lm_batches``)."""
    model = tiny_lm(masked)
    train, evaluated = lm_batches(VOCAB, masked, count=8, seed=5), lm_batches(VOCAB, masked)
    trainer = Trainer(model=model, args=arguments(
        tmp_path, per_device_train_batch_size=6, per_device_eval_batch_size=3,
        eval_strategy="epoch", logging_strategy="epoch"),
        train_dataset=Rows(train), eval_dataset=Rows(evaluated), callbacks=callbacks)
    trainer.train()
    return trainer, model.eval(), train, evaluated


def assert_same(got: dict, want: dict, prefix: str, rel: float) -> None:
    assert [key for key in got if key.startswith(prefix)] == [prefix + key for key in want]
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[prefix + key]), key
        else:
            assert got[prefix + key] == pytest.approx(value, rel=rel, abs=rel * 1e-2), key


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "masked"])
@pytest.mark.filterwarnings("ignore:C > D")
def test_a_language_model_is_measured_token_by_token(tmp_path, masked):
    callback = NeuralCollapseCallback(vocabulary=None if masked else LM_OPTIONS)
    trainer, model, train, evaluated = fit_lm(tmp_path / "measured", masked, [callback])
    rows = nc_rows(trainer)
    assert [(row["step"], "nc/nc1" in row, "eval_nc/nc1" in row) for row in rows] == [
        (4, True, False), (4, False, True), (8, True, True)]
    options = {} if masked else LM_OPTIONS
    final = rows[-1]
    # the eval loader's batches are those of lm_batches, in order: the same float32
    # features, so the same numbers to the last bit
    assert_same(final, measure_language_model(model, evaluated, **options), "eval_nc/", 1e-12)
    # the train loader shuffles its rows into other batches of float32 features
    assert_same(final, measure_language_model(model, train, **options), "nc/", 1e-5)
    assert final["eval_nc/classes_measured"] < VOCAB  # the tokens that occur as labels
    if masked:
        return
    alone, *_ = fit_lm(tmp_path / "alone", masked, None)
    theirs = [row for row in trainer.state.log_history if row not in rows]
    assert untimed(theirs) == untimed(alone.state.log_history)  # loss for loss
    assert [row["epoch"] for row in theirs if "eval_loss" in row] == [1.0, 2.0]


def test_a_token_classifier_is_skipped_with_one_warning_and_trains_on(tmp_path):
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=8,
                        num_labels=3)
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    train = Rows([{"input_ids": torch.randint(0, 32, (16, 8)),
                   "labels": torch.randint(0, 3, (16, 8))}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, [NeuralCollapseCallback(every_n_steps=1)], model=model,
                         train=train, evaluated=False)
    ours = [w for w in caught if "NeuralCollapseCallback" in str(w.message)]
    assert len(ours) == 1 and "labels of shape (8, 8)" in str(ours[0].message)
    assert trainer.state.global_step == 4 and nc_rows(trainer) == []


def test_bad_arguments_name_the_problem(tmp_path):
    trainer = Trainer(model=tiny_bert(NUM_CLASSES), args=arguments(tmp_path))
    with pytest.raises(ValueError, match=r"takes no trainer: pass it as Trainer\(callbacks="):
        NeuralCollapseCallback(trainer)
    with pytest.raises(ValueError, match="splits"):
        NeuralCollapseCallback(splits=("val",))
    with pytest.raises(ValueError, match="every_n_steps"):
        NeuralCollapseCallback(every_n_steps=0)
    with pytest.raises(ValueError, match=r"layer: BertForSequenceClassification has no module "
                                         r"'fc' \(its nn.Linear modules: .*classifier\)"):
        fit(tmp_path, [NeuralCollapseCallback(layer="fc")])
    with pytest.raises(ValueError, match=r"^vocabulary: top_j not among the options of a "
                                         r"language model's token samples \(min_count, top_k"):
        NeuralCollapseCallback(vocabulary={"top_j": 5})
    with pytest.raises(ValueError, match=r"^cdnv_power must be 1 or 2, got 3"):
        NeuralCollapseCallback(vocabulary={"cdnv_power": 3})
    with pytest.raises(ValueError, match=r"^vocabulary: options of a language model's token "
                                         r"samples, but BertForSequenceClassification is "
                                         r"measured at the input of a classifier layer"):
        fit(tmp_path, [NeuralCollapseCallback(vocabulary={"min_count": 2})])


def test_epochs_beyond_the_run_are_warned_about_when_it_starts(tmp_path):
    with pytest.warns(UserWarning, match=r"epochs \[5\] are beyond this run \(2 epochs\)"):
        trainer, _ = fit(tmp_path, [NeuralCollapseCallback(epochs=[1, 5])])
    assert [row["epoch"] for row in nc_rows(trainer)] == [1.0]
