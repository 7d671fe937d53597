"""A deterministic, resumable order of training samples over a weighted mix of datasets.

Each epoch's order is a pure function of (seed, epoch), so a resumed run can skip exactly the batches
it already consumed instead of replaying a data loader. Processes split every global batch: process `r`
of `n` takes the `r`-th slice, so one process with batch `n*b` sees the same samples per step as `n`
processes with batch `b`. Each sample comes with its draw number (its place in the whole training order), which
seeds whatever a dataset varies per draw (`train.data.TrainingMix`): the same for any number of processes and
after a resume.
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


GROUP_BATCHES = 16  # length grouping sorts runs of this many global batches


def group_by_length(order: np.ndarray, lengths: np.ndarray, sources: np.ndarray, global_batch_size: int,
                    rng) -> np.ndarray:
    """One epoch's `order` rearranged so that each global batch holds samples of similar length, in the mix of
    sources the plain order has.

    Within each run of `GROUP_BATCHES` batches, every sample gets its length rank among the samples of its own
    source (`sources[i]`: the dataset of sample `i`) as a fraction; the run is sorted by that fraction and cut
    into batches, which are then shuffled. So a batch holds the short samples of every source, or the long
    ones: padding shrinks, and no batch is made of one source only (which would make the steps alternate
    between tasks). A trailing incomplete batch stays at the end."""
    usable = len(order) // global_batch_size * global_batch_size
    span = global_batch_size * GROUP_BATCHES
    batches = []
    for start in range(0, usable, span):
        run = order[start:min(start + span, usable)]
        rank = np.zeros(len(run))
        for source in np.unique(sources[run]):
            members = np.flatnonzero(sources[run] == source)
            by_length = members[np.argsort(lengths[run[members]], kind="stable")]
            rank[by_length] = (np.arange(len(members)) + 0.5) / len(members)
        batches.append(run[np.argsort(rank, kind="stable")].reshape(-1, global_batch_size))
    batches = np.concatenate(batches)
    return np.concatenate([batches[rng.permutation(len(batches))].reshape(-1), order[usable:]])


class ResumableBatchSampler:
    """Yields this process's `(index, draw)` lists, one global batch after the other, epoch after epoch, forever,
    starting at global batch number `start_batch` (counted from the start of training, so a resumed run
    passes the number of batches it consumed). `index` is into the concatenated datasets, `draw` numbers the
    sample's place in the training order. Incomplete global batches at an epoch's end are dropped.
    With `lengths` (one per sample of the concatenated datasets) batches are grouped by length."""

    def __init__(self, sizes: list[int], weights: list[float], global_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0, lengths=None):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {world_size} processes")
        self.sizes, self.weights = list(sizes), list(weights)
        self.global_batch_size, self.seed = global_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_batch = start_batch
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and len(self.lengths) != sum(self.sizes):
            raise ValueError(f"{len(self.lengths)} lengths for {sum(self.sizes)} samples")
        self.sources = np.repeat(np.arange(len(self.sizes)), self.sizes)
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
            if self.lengths is not None:
                order = group_by_length(order, self.lengths, self.sources, self.global_batch_size,
                                        np.random.default_rng([self.seed, epoch, 1]))
            first_draw = epoch * len(order)
            for number in range(batch, self.batches_per_epoch):
                start = number * self.global_batch_size + self.rank * local
                yield [(index, first_draw + position) for position, index in
                       enumerate(order[start:start + local].tolist(), start=start)]
            epoch, batch = epoch + 1, 0
