"""Which samples a process takes, and each sample's seed: the same steps whatever the
process layout, worker count or resume point."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's randomness (augmentation, diffusion noise): a function of the
    run seed, the epoch and the sample alone, so it does not depend on the worker, the
    process layout or a resume."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint32)[0])


class ResumableSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch) and can start mid-epoch (resume)."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0  # samples of this rank's epoch list to skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start
