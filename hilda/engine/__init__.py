"""What every fit shares, pre-training and evaluation alike: devices and the process group,
the resumable sampler and per-sample seeds, augmentations, the optimiser and schedule,
checkpoints, the metrics log and the config loader. Imports nothing of ``hilda.train`` or
``hilda.eval``."""
