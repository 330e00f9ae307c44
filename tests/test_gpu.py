"""The CUDA tier: what depends on the device, run on `cuda`. Every test here skips with the
reason where there is no GPU; bench/gpu_check.sh runs them (`pytest -m gpu`) on one that has.
The compiled/eager resume test in test_trainer_options.py is part of this tier too."""
import json
import math
import re
import signal

import pytest
import torch

from config import RunConfig
from conftest import PLAIN_DATA, needs_cuda, run_main, write_yaml
from engine import checkpoint
from engine.run import run
from test_ddp import two_ranks_follow_one_process
from test_resume import assert_same_as, slow_config, start, wait_for_rows

pytestmark = [*needs_cuda, pytest.mark.slow]


def on_cuda(config: dict) -> dict:
    return {**config, "device": "cuda"}


def test_sigkill_then_resume_is_bit_identical_on_cuda(workdir):
    # Deterministic mode: cuBLAS's workspace setting and deterministic kernels (reproducibility.py).
    reference = run_main("--run_config", str(write_yaml(workdir / "ref.yaml",
                                                       on_cuda({**slow_config(), "group": "reference"}))),
                         cwd=workdir)
    assert reference.returncode == 0, reference.stderr
    path = write_yaml(workdir / "c.yaml", on_cuda({**slow_config(), "group": "killed"}))
    group_dir = workdir / "runs" / "test" / "killed"
    proc = start(workdir, "--run_config", path)
    wait_for_rows(group_dir / "3" / "metrics.csv", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_main("--run_config", str(path), "--resume", cwd=workdir)  # crashed here before: RNG states
    assert resumed.returncode == 0, resumed.stderr                          # were loaded onto the GPU
    assert_same_as(group_dir, workdir / "runs" / "test" / "reference")


def test_cuda_generator_states_of_more_gpus_than_here_restore_those_that_exist():
    states = checkpoint.rng_states()
    extra = torch.cuda.get_rng_state(0)
    states["cuda"] = [extra.clone() for _ in range(torch.cuda.device_count() + 1)]
    checkpoint.set_rng_states(states)
    assert torch.equal(torch.cuda.get_rng_state(0), extra)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_on_cuda(workdir, tiny, precision):
    config = on_cuda({**tiny, "group": "amp", "checkpoint_every_s": 0, "trainer": {"precision": precision}})
    done = run(RunConfig.from_dict(config))
    assert all(math.isfinite(h["train_loss"]) for h in done.seeds[0].history)
    state = checkpoint.load(done.group_dir / "7" / "checkpoint.pt")
    assert ("scale" in state["scaler"]) == (precision == "fp16")  # a scaler only where fp16 needs one
    longer = run(RunConfig.from_dict({**config, "epochs": config["epochs"] + 2}), resume=True)
    assert longer.seeds[0].status == "completed" and longer.seeds[0].epochs_run == config["epochs"] + 2


def test_preflight_on_cuda(workdir, tiny):
    result = run_main("--run_config", str(write_yaml(workdir / "c.yaml", on_cuda(tiny))), "--preflight",
                      cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^  peak memory\s+\d+ MiB \(CUDA, peak allocated\)$", result.stdout, re.M)
    assert re.search(r"^  device\s+cuda$", result.stdout, re.M)


def test_the_dataloader_path_with_pinned_memory(workdir, tiny, monkeypatch):
    (workdir / "plain_data.py").write_text(PLAIN_DATA)  # data: plain_data.load
    monkeypatch.syspath_prepend(str(workdir))
    config = on_cuda({**tiny, "data": "plain_data.load"})
    inline = run(RunConfig.from_dict({**config, "group": "inline"})).seeds[0].history
    pinned = run(RunConfig.from_dict({**config, "group": "pinned", "trainer": {
        "num_workers": 1, "pin_memory": True}})).seeds[0].history  # non_blocking copies from pinned memory
    for a, b in zip(inline, pinned, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP with nccl needs two GPUs")
def test_two_ranks_with_nccl_match_one_process(workdir, tiny):
    config = on_cuda({**tiny, "seeds": [3], "epochs": 3, "batch_size": 64, "checkpoint_every_s": 0,
                      "scheduler_config": {"T_max": 3}})
    _, runs = two_ranks_follow_one_process(workdir, config, rel=1e-4)  # GPU sums differ in order
    provenance = json.loads((runs / "two" / "provenance.json").read_text())["invocations"][-1]
    assert provenance["device"] == "cuda:0"  # rank 0's GPU
