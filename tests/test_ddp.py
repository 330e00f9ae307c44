"""torchrun with DistributedDataParallel on CPU (gloo): 2 processes match 1 process with
the same global batch, write one set of files, exit cleanly, and their checkpoints
resume in one process (and the other way round)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PLAIN_DATA, ROOT, child_env, run_main, write_yaml

pytestmark = pytest.mark.slow  # every test here starts processes

TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(workdir, *args, env=None):
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed beside this Python")
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"), *args],
                          cwd=workdir, env=child_env({"OMP_NUM_THREADS": "1", **(env or {})}),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def losses(group_dir):
    with open(group_dir / "3" / "metrics.csv") as f:
        return [(float(r["train_loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]


@pytest.fixture
def ddp_config(tiny):
    tiny.update(seeds=[3], epochs=4, batch_size=64, checkpoint_every_s=0, scheduler_config={"T_max": 4})
    return tiny


def two_ranks_follow_one_process(workdir, config, env=None, rel=1e-5):
    """Train `config` with 2 ranks (group two; `env` added to theirs) and in one process
    (group one); their losses must agree. Returns torchrun's completed process and the runs folder."""
    write_yaml(workdir / "c.yaml", config)
    two = torchrun(workdir, "--run_config", "c.yaml", "--set", "group=two", env=env)
    assert two.returncode == 0, two.stdout + two.stderr
    one = run_main("--run_config", "c.yaml", "--set", "group=one", cwd=workdir)
    assert one.returncode == 0, one.stderr
    runs = workdir / "runs" / "test"
    for (t2, v2), (t1, v1) in zip(losses(runs / "two"), losses(runs / "one"), strict=True):
        assert t2 == pytest.approx(t1, rel=rel) and v2 == pytest.approx(v1, rel=rel)
    return two, runs


def test_two_ranks_match_one_process(workdir, ddp_config):
    two, runs = two_ranks_follow_one_process(workdir, ddp_config)
    assert two.stdout.count("files: ") == 1  # one summary: rank 0's
    assert sorted(p.name for p in (runs / "two" / "3").iterdir()) == \
        sorted(p.name for p in (runs / "one" / "3").iterdir())  # one set of run files


def test_checkpoints_move_between_ddp_and_one_process(workdir, ddp_config):
    runs = workdir / "runs" / "test"
    write_yaml(workdir / "c.yaml", ddp_config)
    assert run_main("--run_config", "c.yaml", "--set", "group=straight", cwd=workdir).returncode == 0
    # Two epochs under DDP, then two more in one process.
    write_yaml(workdir / "half.yaml", {**ddp_config, "epochs": 2})
    first = torchrun(workdir, "--run_config", "half.yaml", "--set", "group=mixed")
    assert first.returncode == 0, first.stdout + first.stderr
    rest = run_main("--run_config", "c.yaml", "--set", "group=mixed", "--resume", cwd=workdir)
    assert rest.returncode == 0, rest.stderr
    # And the other way: two epochs in one process, two more under DDP.
    assert run_main("--run_config", "half.yaml", "--set", "group=back", cwd=workdir).returncode == 0
    back = torchrun(workdir, "--run_config", "c.yaml", "--set", "group=back", "--resume")
    assert back.returncode == 0, back.stdout + back.stderr
    for group in ("mixed", "back"):
        for (ta, va), (tb, vb) in zip(losses(runs / group), losses(runs / "straight"), strict=True):
            assert ta == pytest.approx(tb, rel=1e-5) and va == pytest.approx(vb, rel=1e-5)
        assert json.loads((runs / group / "3" / "result.json").read_text())["epochs_run"] == 4


def test_a_search_under_torchrun(workdir, ddp_config):
    import optuna
    from optuna.trial import TrialState
    ddp_config["epochs"] = 3
    write_yaml(workdir / "c.yaml", ddp_config)
    space = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-2, "log": True}}}
    write_yaml(workdir / "o.yaml", {"trials": 3, "seed": 0, "pruner": None, "study_name": "s",
                                    "search_space": space})
    # Every trial is pruned early by rank 0's pruner: the other rank must stop with it (no hang).
    write_yaml(workdir / "p.yaml", {"trials": 2, "seed": 0, "study_name": "p", "search_space": space,
                                    "pruner": "optuna.pruners.ThresholdPruner",
                                    "pruner_config": {"upper": 1e-9, "n_warmup_steps": 1}})
    searched = torchrun(workdir, "--run_config", "c.yaml", "--optimize_config", "o.yaml")
    assert searched.returncode == 0, searched.stdout + searched.stderr
    assert searched.stdout.count("best trial") == 1  # rank 0 reports
    pruned = torchrun(workdir, "--run_config", "c.yaml", "--optimize_config", "p.yaml")
    assert pruned.returncode == 1 and "2 pruned" in pruned.stdout, pruned.stdout + pruned.stderr
    storage = f"sqlite:///{workdir / 'runs' / 'test' / 'optuna.db'}"
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).get_trials()]
    assert states == [TrialState.COMPLETE] * 3
    pruned_trials = optuna.load_study(study_name="p", storage=storage).get_trials()
    assert [t.state for t in pruned_trials] == [TrialState.PRUNED] * 2
    assert all(max(t.intermediate_values) < 3 for t in pruned_trials)  # stopped early, on both ranks


def test_dataloader_path_is_sharded_too(workdir, ddp_config):
    (workdir / "plain_data.py").write_text(PLAIN_DATA)  # data: plain_data.load
    ddp_config.update(data="plain_data.load", epochs=2)
    two_ranks_follow_one_process(workdir, ddp_config)


def test_a_models_own_loss_trains_through_ddp(workdir, ddp_config):
    # The loss step, hook included, runs inside DDP's forward: gradients are averaged
    # across ranks, so 2 ranks still follow 1 process.
    (workdir / "penalised.py").write_text(
        "from model import MLP\n\n"
        "class Penalised(MLP):\n"
        "    def loss(self, x, y, criterion):\n"
        "        return criterion(self(x), y) + 0.01 * sum(p.square().sum() for p in self.parameters())\n")
    ddp_config.update(net="penalised.Penalised", epochs=3)
    _, runs = two_ranks_follow_one_process(workdir, ddp_config)
    plain = run_main("--run_config", "c.yaml", "--set", "group=plain", "--set", "net=model.MLP", cwd=workdir)
    assert plain.returncode == 0, plain.stderr
    # The penalty was trained and reported: the same seed without it logs smaller losses.
    assert all(t2 > tp for (t2, _), (tp, _) in zip(losses(runs / "two"), losses(runs / "plain"), strict=True))


ALLREDUCE_COUNTER = '''
import atexit, os
import torch.nn.parallel as parallel
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

calls = [0]
_init = parallel.DistributedDataParallel.__init__


def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)

    def counting(state, bucket):
        calls[0] += 1
        return allreduce_hook(state, bucket)

    self.register_comm_hook(None, counting)


parallel.DistributedDataParallel.__init__ = __init__
if "RANK" in os.environ:  # the ranks, not torchrun's own process
    count_file = os.environ["ALLREDUCE_COUNT"] + os.environ["RANK"]
    atexit.register(lambda: open(count_file, "w").write(str(calls[0])))
'''


def test_accumulation_under_ddp_all_reduces_once_per_step(workdir, ddp_config):
    # 300 training samples in global batches of 64: 5 batches an epoch; grad_accum 2 steps
    # after batches 2, 4 and 5 (the last one alone, counting whole). A sitecustomize counts
    # DDP's gradient all-reduces (a tiny model fits one bucket): one per step, not per batch.
    hook = workdir / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(ALLREDUCE_COUNTER)
    ddp_config["trainer"] = {"grad_accum": 2}
    # The accumulated steps are those of one process ...
    two_ranks_follow_one_process(workdir, ddp_config, env={"PYTHONPATH": str(hook),
                                                           "ALLREDUCE_COUNT": str(workdir / "count")})
    # ... with one all-reduce per optimizer step on each rank.
    epochs, steps_per_epoch = ddp_config["epochs"], 3
    assert [int((workdir / f"count{rank}").read_text()) for rank in (0, 1)] == [epochs * steps_per_epoch] * 2


def test_a_signal_to_one_rank_stops_every_rank_within_a_few_steps(workdir, ddp_config):
    import signal
    import time

    from engine import checkpoint
    # Long epochs of small batches, so that the signal lands in the middle of one.
    ddp_config.update(epochs=2, batch_size=8, data_config={**ddp_config["data_config"], "n": 6000})
    write_yaml(workdir / "c.yaml", ddp_config)
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed beside this Python")
    with open(workdir / "out.txt", "w") as out:
        proc = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"),
                                 "--run_config", "c.yaml", "--set", "group=stopped"], cwd=workdir,
                                env=child_env({"OMP_NUM_THREADS": "1"}), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    csv_path = workdir / "runs" / "test" / "stopped" / "3" / "metrics.csv"
    deadline = time.time() + 120
    while not (csv_path.exists() and len(csv_path.read_text().splitlines()) >= 2):  # epoch 1 done
        assert proc.poll() is None and time.time() < deadline, (workdir / "out.txt").read_text()
        time.sleep(0.05)
    rank1 = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank1(p, workdir)]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGTERM)  # rank 1 only: rank 0 learns of it from the agreement
    proc.wait(timeout=120)
    state = checkpoint.load(workdir / "runs" / "test" / "stopped" / "3" / "checkpoint.pt")
    assert state["epoch"] == 1 and 0 < state["batch"] < 600, state["batch"]  # mid-epoch, on every rank
    assert run_main("--run_config", "c.yaml", "--set", "group=straight", cwd=workdir).returncode == 0
    resumed = run_main("--run_config", "c.yaml", "--set", "group=stopped", "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    runs = workdir / "runs" / "test"
    for (ta, va), (tb, vb) in zip(losses(runs / "stopped"), losses(runs / "straight"), strict=True):
        assert ta == pytest.approx(tb, rel=1e-5) and va == pytest.approx(vb, rel=1e-5)


def _is_rank1(proc_dir: Path, workdir: Path) -> bool:
    """Whether /proc/<pid> is rank 1 of a main.py started in `workdir`."""
    try:
        environ = (proc_dir / "environ").read_bytes().split(b"\0")
        return (b"RANK=1" in environ and b"main.py" in (proc_dir / "cmdline").read_bytes()
                and Path(os.readlink(proc_dir / "cwd")) == workdir)
    except OSError:
        return False
