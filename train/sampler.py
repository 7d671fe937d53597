"""A deterministic, resumable order of training samples over a weighted mix of datasets.

Each epoch's order is a pure function of (seed, epoch), so a resumed run can skip exactly the batches
it already consumed instead of replaying a data loader. Processes split every global batch: process `r`
of `n` takes the `r`-th slice, so one process with batch `n*b` sees the same samples per step as `n`
processes with batch `b`.
"""

import numpy as np


def mixture_epoch(sizes: list[int], weights: list[float], seed: int, epoch: int) -> np.ndarray:
    """Shuffled indices into the concatenation of datasets of `sizes` for one epoch.

    A dataset of weight `w` contributes `round(w * size)` samples per epoch: each sample `floor(w)`
    times, plus a seeded subset for the fractional part."""
    rng = np.random.default_rng([seed, epoch])
    chosen, offset = [], 0
    for size, weight in zip(sizes, weights):
        whole, fraction = divmod(weight, 1.0)
        indices = np.arange(offset, offset + size)
        chosen += [indices] * int(whole)
        extra = int(round(fraction * size))
        if extra:
            chosen.append(np.sort(rng.choice(indices, size=extra, replace=False)))
        offset += size
    order = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return order[rng.permutation(len(order))]


class ResumableBatchSampler:
    """Yields this process's index lists, one global batch after the other, epoch after epoch, forever,
    starting at global batch number `start_batch` (counted from the start of training, so a resumed run
    passes the number of batches it consumed). Incomplete global batches at an epoch's end are dropped."""

    def __init__(self, sizes: list[int], weights: list[float], global_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {world_size} processes")
        self.sizes, self.weights = list(sizes), list(weights)
        self.global_batch_size, self.seed = global_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_batch = start_batch
        self.batches_per_epoch = len(mixture_epoch(self.sizes, self.weights, seed, 0)) // global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the data mix gives fewer samples per epoch than one global batch ({global_batch_size}): "
                "add data, raise the weights or lower batch_size"
            )

    def epoch_of(self, batch_number: int) -> int:
        return batch_number // self.batches_per_epoch

    def __iter__(self):
        local = self.global_batch_size // self.world_size
        epoch, batch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            order = mixture_epoch(self.sizes, self.weights, self.seed, epoch)
            for number in range(batch, self.batches_per_epoch):
                start = number * self.global_batch_size + self.rank * local
                yield order[start:start + local].tolist()
            epoch, batch = epoch + 1, 0
