"""Training far past zero error: the loop (`loop`), its steps (`steps`), what survives on
disk and how a run resumes (`run_state`), the background writer (`writer`) and
torch.distributed (`distributed`)."""
