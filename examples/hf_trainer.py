"""Neural collapse inside a Hugging Face Trainer (a tiny BERT, trained from scratch).

    python examples/hf_trainer.py                     # 10 epochs, under a minute on a CPU
    NCTOOLS_EXAMPLES_TINY=1 python examples/hf_trainer.py   # 2 epochs (CI)

The callback goes in `Trainer(callbacks=[...])` like any Hugging Face callback. Its rows
are in `trainer.state.log_history` and reach every `report_to` integration: `nc/nc1` for
the training set (TensorBoard: `train/nc/nc1`), `eval_nc/nc1` for the eval set
(`eval/nc/nc1`); the Trainer's own rows are left as they are.
"""

import os

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from nctools.integrations.hf import NeuralCollapseCallback

TINY = os.environ.get("NCTOOLS_EXAMPLES_TINY") == "1"


class Tokens(Dataset):
    """n sequences of 6 tokens; the first token is the label, so the task is learnable."""

    def __init__(self, n):
        self.labels = torch.arange(n) % 3
        self.ids = torch.randint(3, 30, (n, 6))
        self.ids[:, 0] = self.labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


if __name__ == "__main__":
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, num_labels=3,
                        max_position_embeddings=8)
    args = TrainingArguments(output_dir="runs/hf-example", num_train_epochs=2 if TINY else 10,
                             use_cpu=True, report_to=[], save_strategy="no",
                             eval_strategy="epoch", disable_tqdm=True, seed=0)
    # measured at each epoch end (the training set) and each evaluation (the eval set)
    trainer = Trainer(model=BertForSequenceClassification(config), args=args,
                      train_dataset=Tokens(48), eval_dataset=Tokens(21),
                      callbacks=[NeuralCollapseCallback(layer="classifier")])
    trainer.train()
    rows = {}  # epoch -> its nc values, from the rows of the epoch end and the evaluation
    for row in trainer.state.log_history:
        if any(key.startswith(("nc/", "eval_nc/")) for key in row):
            rows.setdefault(round(row["epoch"]), {}).update(row)
    for epoch, row in rows.items():
        print(f"epoch {epoch} train nc1 {row['nc/nc1']:.3g} "
              f"eval ncc_accuracy {row['eval_nc/ncc_accuracy']:.3f}")
