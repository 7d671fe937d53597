"""The shipped accelerate configs read as accelerate reads them: its own config parser, and for FSDP its plugin,
which refuses options FSDP2 does not have. (They also train, on CPU processes: tests/test_train_engines.py.)"""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs" / "accelerate"


@pytest.mark.parametrize("name, engine", [("multi_gpu", DistributedType.MULTI_GPU),
                                          ("deepspeed_zero2", DistributedType.DEEPSPEED),
                                          ("deepspeed_zero3", DistributedType.DEEPSPEED),
                                          ("fsdp", DistributedType.FSDP)])
def test_each_config_parses_as_accelerate_reads_it(name, engine):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == engine and config.num_processes == 8 and not config.use_cpu
    if engine == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_the_fsdp_config_is_fsdp2_and_accepted_by_the_plugin():
    options = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=options["fsdp_version"], auto_wrap_policy=options["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[options["fsdp_transformer_layer_cls_to_wrap"]],
        reshard_after_forward=options["fsdp_reshard_after_forward"], state_dict_type=options["fsdp_state_dict_type"],
        cpu_offload=options["fsdp_offload_params"], cpu_ram_efficient_loading=options["fsdp_cpu_ram_efficient_loading"])
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
