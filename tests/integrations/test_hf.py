"""The Hugging Face callback logs nctools.measure's numbers of independently extracted
features into the Trainer's log history and its report_to loggers (TensorBoard here)."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer, TrainingArguments

from nctools import measure
from nctools.integrations.hf import NeuralCollapseCallback
from tests.helpers import Tokens, tiny_bert

NUM_CLASSES = 3


def test_logged_values_equal_measure_and_reach_tensorboard(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert(NUM_CLASSES)
    train, val = Tokens(48, 1), Tokens(21, 2)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=8,
        per_device_eval_batch_size=16, learning_rate=1e-3, use_cpu=True, report_to=["tensorboard"],
        save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.add_callback(NeuralCollapseCallback(trainer))
    trainer.train()
    logged = [row for row in trainer.state.log_history if "nc/train/nc1" in row]
    assert [row["epoch"] for row in logged] == [1.0, 2.0]

    model.eval()
    with torch.no_grad():  # the head's input: BERT's pooled output (dropout off in eval)
        h = model.bert(input_ids=train.ids).pooler_output
        h_val = model.bert(input_ids=val.ids).pooler_output
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    means = torch.stack([h[train.labels == c].mean(0) for c in range(NUM_CLASSES)])
    want = {"train": measure(h, train.labels, weight, bias),
            "eval": measure(h_val, val.labels, weight, bias, class_means=means)}  # fmt: skip
    for split, values in want.items():
        for key, value in values.items():
            got = logged[-1][f"nc/{split}/{key}"]
            assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (split, key)

    (event_file,) = (tmp_path / "out").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    curve = events.Scalars("train/nc/train/nc1")  # report_to prefixes non-eval keys "train/"
    assert len(curve) == 2
    assert curve[-1].value == pytest.approx(logged[-1]["nc/train/nc1"], rel=1e-6)
