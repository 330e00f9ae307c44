"""The GPU a rank picks, given the environment Slurm or torchrun sets and what the process can
see: a decision tested without a GPU."""
import pytest

from engine.distributed import cuda_device
from engine.errors import ConfigError


@pytest.mark.parametrize("env, visible, device", [  # visible: what torch.cuda.device_count() says
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "3"}, 1, "cuda:0"),  # gpus_per_task
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "2,3"}, 2, "cuda:0"),  # 2 each
    ({"SLURM_LOCALID": "2", "CUDA_VISIBLE_DEVICES": "2"}, 1, "cuda:0"),  # Slurm's variable alone
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 4, "cuda:3"),  # torchrun: every process sees all four
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4, "cuda:1"),
    ({"LOCAL_RANK": "2"}, 8, "cuda:2"),  # all of them, the count of local ranks unknown
])
def test_a_rank_trains_on_a_gpu_it_can_see(env, visible, device):
    assert cuda_device(env, visible) == device
    assert int(device.split(":")[1]) < visible


@pytest.mark.parametrize("env, visible", [({"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}, 0),
                                          ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 2),  # 4 share 2
                                          ({"LOCAL_RANK": "1"}, 1)])
def test_a_rank_without_a_gpu_of_its_own_is_one_line(env, visible):
    with pytest.raises(ConfigError) as caught:
        cuda_device(env, visible)
    assert "\n" not in str(caught.value) and "GPU" in str(caught.value)
