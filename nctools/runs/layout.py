"""The run directory's file names and table columns: every one here, once.

Imports nothing, so the command line can name a run's files without loading torch.

    RUN/config.yaml  run.json  history.csv  checkpoint.pt  metrics.csv  figures/  logs/
    RUN/snapshots/epoch-NNNN/{train,test}.safetensors  classifier.safetensors  meta.json
    SWEEP/sweep.json  SWEEP/runs/NAME/ (a run directory each)  SWEEP/submitit/
"""

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "run.json"
HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.csv"
SNAPSHOTS_DIR = "snapshots"
FIGURES_DIR = "figures"
# train_acc_running: the running, train-mode accuracy of the epoch's SGD steps (parameters
# changing as it goes); train_acc: eval-mode accuracy on the whole training split, measured
# at snapshot epochs and, until the onset of the terminal phase, wherever the running
# accuracy reaches train.tpt_accuracy (empty elsewhere).
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_acc_running", "train_acc", "test_loss",
                   "test_acc", "seconds")
META_FILE = "meta.json"
CLASSIFIER_FILE = "classifier.safetensors"
LOGS_DIR = "logs"  # experiment loggers' files (TensorBoard events, MLflow/W&B stores)
PENULTIMATE = "features"  # metrics.csv's `layer` of the penultimate features
# a sweep folder: SWEEP/sweep.json, SWEEP/runs/NAME/ (one run directory per point),
# SWEEP/submitit/ (the job files and logs of submitit)
SWEEP_FILE = "sweep.json"
SWEEP_RUNS_DIR = "runs"
SUBMITIT_DIR = "submitit"
