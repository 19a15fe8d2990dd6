"""Training far past zero error: the loop in one screen (`loop`), its steps (`steps`), what
a run holds and how it is built, saved and restored (`run_state`), the progress bar
(`progress`), the background writer (`writer`), torch.distributed (`distributed`), the
experiment loggers (`loggers`) and sweeps on submitit (`launch`)."""
