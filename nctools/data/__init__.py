"""Data sets as standardised tensors: splits and batches (`sets`), the embedded mnist5k
and synthetic sets, and the sets read from disk through torchvision (`torchvision_sets`)."""
