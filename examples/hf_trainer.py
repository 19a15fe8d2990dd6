"""Neural collapse inside a Hugging Face Trainer (a tiny BERT, trained from scratch).

    python examples/hf_trainer.py                     # 10 epochs, under a minute on a CPU
    NCTOOLS_EXAMPLES_TINY=1 python examples/hf_trainer.py   # 2 epochs (CI)

The values go through `Trainer.log`: they are in `trainer.state.log_history` and reach every
`report_to` integration (TensorBoard shows them as `train/nc/train/nc1`).
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
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=BertForSequenceClassification(config), args=args,
                      train_dataset=Tokens(48), eval_dataset=Tokens(21))
    # the callback measures the trainer's own train and eval sets at each epoch end
    trainer.add_callback(NeuralCollapseCallback(trainer))
    trainer.train()
    for row in trainer.state.log_history:
        if "nc/train/nc1" in row:
            print(f"epoch {row['epoch']:.0f} train nc1 {row['nc/train/nc1']:.3g} "
                  f"eval ncc_accuracy {row['nc/eval/ncc_accuracy']:.3f}")
