"""Training: the loop (:mod:`.trainer`), its setup, batches and negatives, resumable checkpoints,
and launching it (torchrun on this machine, a PyTorchJob on Kubernetes)."""
