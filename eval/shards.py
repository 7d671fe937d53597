"""Evaluation split across the processes of `accelerate launch`: each answers its share of the requests.

    accelerate launch --num_processes 4 "$(which vlm)" eval pope --model DIR --pope-files ... --out DIR
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 "$(which vlm)" eval ...   # CPU processes

The main process keeps the answers file; every process appends its answers to a shard file beside it
(`NAME.jsonl.rank1`, ...), and the main process merges them into the answers file in request order once all are
done, or when the next run starts after an interruption, whatever its number of processes. So each request is
answered once, the answers file looks the same as from one process, and the metrics are the same.

The processes meet at barriers on a gloo group of their own (on GPUs too). A process that does not arrive in
time (stuck, or dead without the launcher noticing) fails the barrier with an error naming its rank instead of
leaving the others waiting.
"""

import functools
import os
from dataclasses import dataclass
from datetime import timedelta

DEFAULT_TIMEOUT = timedelta(hours=1)  # how long the first process to finish waits for the last one


class ShardTimeoutError(RuntimeError):
    """A process of a sharded evaluation did not reach a barrier in time."""


@dataclass
class Shard:
    """This process's place in the evaluation: `rank` of `world_size`, and the group its barriers run on."""

    rank: int = 0
    world_size: int = 1
    group: object = None
    timeout: timedelta = DEFAULT_TIMEOUT

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: list) -> list:
        """This process's share: every `world_size`-th item from `rank` on."""
        return items[self.rank::self.world_size]

    def barrier(self, where: str) -> None:
        """Wait until every process is here; a process missing after `timeout` is named."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as error:
            raise ShardTimeoutError(f"sharded evaluation, rank {self.rank} of {self.world_size}: not every process "
                                    f"reached '{where}' within {self.timeout} ({error})") from None


@functools.cache
def current_shard() -> Shard:
    """One process, or this process of those `accelerate launch` (torchrun) started (`WORLD_SIZE` > 1). Made
    once per process: creating the barrier group is a collective call that every process makes at the same point
    (the first answers file); `VLM_EVAL_RANK_TIMEOUT` (seconds) sets how long a barrier waits."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    timeout = timedelta(seconds=float(os.environ.get("VLM_EVAL_RANK_TIMEOUT", DEFAULT_TIMEOUT.total_seconds())))
    # joins the launcher's process group (gloo on CPUs, NCCL on GPUs); CPU processes are asked for as
    # `Accelerator` is, through ACCELERATE_USE_CPU
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    group = dist.new_group(backend="gloo", timeout=timeout)  # monitored barriers exist for gloo only
    return Shard(state.process_index, state.num_processes, group, timeout)
