"""The Hugging Face callback, passed as ``Trainer(callbacks=[...])``, logs nctools.measure's
numbers of independently extracted features into the Trainer's log history and its
report_to loggers, and never changes what the Trainer itself logs."""

import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from nctools import measure
from nctools.integrations.hf import NeuralCollapseCallback
from tests.helpers import Tokens, tiny_bert

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


class Causal(torch.utils.data.Dataset):
    """Token sequences whose labels are the inputs, as a causal language model trains."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_a_causal_language_model_is_skipped_with_one_warning_and_trains_on(tmp_path):
    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, [NeuralCollapseCallback(every_n_steps=1)], model=model,
                         train=Causal(), evaluated=False)
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


def test_epochs_beyond_the_run_are_warned_about_when_it_starts(tmp_path):
    with pytest.warns(UserWarning, match=r"epochs \[5\] are beyond this run \(2 epochs\)"):
        trainer, _ = fit(tmp_path, [NeuralCollapseCallback(epochs=[1, 5])])
    assert [row["epoch"] for row in nc_rows(trainer)] == [1.0]
