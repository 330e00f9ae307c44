"""The Trainer and run(): per-sample losses, best weights on early stopping, NaN,
bit-identical reruns, wandb offline and always closed."""
import csv
import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from config import RunConfig
from conftest import PlainDataset, logged_config
from engine import reproducibility
from engine.reproducibility import set_seed
from engine.run import run
from engine.settings import Settings
from engine.trainer import Trainer, improved
from model import MLP
from util import load_data


BASE = {"project": "t", "seeds": [0], "epochs": 5, "batch_size": 4, "net": "model.MLP",
        "optimizer": "torch.optim.SGD", "data": "util.load_data"}


def make_trainer(model, lr=1e-2, scheduler=None, **settings):
    """A Trainer as a notebook builds one: a model, SGD and a few numbers (Settings' keys)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = scheduler(optimizer) if scheduler else None
    return Trainer(model, optimizer, Settings(**{"epochs": 5, "batch_size": 4, **settings}),
                   scheduler=scheduler, criterion=torch.nn.MSELoss())


def test_settings_are_checked_when_built():
    from config import EarlyStopping, TrainerConfig
    from engine.settings import SettingsError
    with pytest.raises(SettingsError, match="mode: must be 'min' or 'max', got 'minimize'"):
        Settings(epochs=1, batch_size=4, mode="minimize")
    with pytest.raises(SettingsError, match=r"monitor: .*\(did you mean 'val_loss'\?\)"):
        Settings(epochs=1, batch_size=4, monitor="val_los")
    with pytest.raises(SettingsError, match="grad_accum: must be positive, got 0"):
        Settings(epochs=1, batch_size=4, grad_accum=0)
    # The config's sections say the same as the loop's defaults (config.py is the file's
    # schema, engine/settings.py the loop's input; they must not drift apart).
    loop = Settings(epochs=1, batch_size=1)
    sections = {**vars(TrainerConfig()), **vars(EarlyStopping())}
    run_keys = {k: getattr(RunConfig.from_dict(BASE), k) for k in ("monitor", "mode", "checkpoint_every_s")}
    for name, value in {**sections, **run_keys}.items():
        if name not in ("deterministic", "vectorize_seeds"):  # run() applies these, around the loop
            assert getattr(loop, name) == value, name


def test_losses_are_per_sample_means_not_per_batch():
    torch.manual_seed(0)
    x, y = torch.randn(10, 1), torch.randn(10, 1) * 5
    model = MLP({"nodes": 4, "layers": 1})
    trainer = make_trainer(model, batch_size=4)  # batches of 4, 4 and 2
    full = torch.nn.functional.mse_loss(model(x), y).item()
    per_batch = sum(torch.nn.functional.mse_loss(model(x[i:i + 4]), y[i:i + 4]).item() for i in (0, 4, 8)) / 3
    assert abs(per_batch - full) > 1e-3  # a mean of batch means is not the per-sample mean
    assert (trainer.evaluate(trainer.on_device(TensorDataset(x, y)))["val_loss"]
            == pytest.approx(full, rel=1e-6))


def test_early_stopping_keeps_and_reports_the_best_epoch():
    set_seed(0)
    train_set, val_set = load_data(n=200)
    model = MLP({"nodes": 8, "layers": 2})
    # The learning rate grows 4x per epoch: the loss improves, then gets worse.
    trainer = make_trainer(model, lr=1e-2, epochs=30, batch_size=32, patience=2,
                           scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 4.0 ** e))
    result = trainer.train(train_set, val_set, seed=0)
    val_losses = [h["val_loss"] for h in result.history]
    assert result.status in ("early_stopped", "diverged")
    assert result.epochs_run < 30
    assert result.best_epoch == 1 + val_losses.index(min(val_losses))
    assert result.best_epoch < result.epochs_run
    assert result.best_value == min(val_losses) != val_losses[-1]
    # The model handed back holds the best epoch's weights, not the last ones.
    assert (trainer.evaluate(trainer.on_device(val_set))["val_loss"]
            == pytest.approx(result.best_value, rel=1e-6))


def test_max_mode_and_min_delta():
    settings = Settings(epochs=1, batch_size=1, mode="max", min_delta=0.5)
    assert improved(settings, 1.0, 2.0) and not improved(settings, 1.0, 1.4)
    settings = Settings(epochs=1, batch_size=1, mode="min", min_delta=0.5)
    assert improved(settings, 1.0, 0.4) and not improved(settings, 1.0, 0.6)


def test_nan_stops_the_seed_cleanly():
    set_seed(0)
    train_set, val_set = load_data(n=200)
    trainer = make_trainer(MLP({"nodes": 8, "layers": 2}), lr=1e8, epochs=20, batch_size=32)
    result = trainer.train(train_set, val_set, seed=0)
    assert result.status == "diverged"
    assert result.epochs_run < 20
    assert (not math.isfinite(result.history[-1]["train_loss"])
            or not math.isfinite(result.history[-1]["val_loss"]))


def test_general_datasets_use_a_dataloader_with_the_same_numbers():
    """A Dataset that is not a TensorDataset takes the DataLoader path; evaluation agrees."""
    train_set, val_set = load_data(n=100)

    set_seed(1)
    trainer = make_trainer(MLP({"nodes": 4, "layers": 1}), batch_size=7)
    fast = trainer.evaluate(trainer.on_device(val_set))["val_loss"]
    assert (trainer.evaluate(trainer.on_device(PlainDataset(val_set)))["val_loss"]
            == pytest.approx(fast, rel=1e-6))
    result = trainer.train(PlainDataset(train_set), PlainDataset(val_set), seed=1)
    assert result.epochs_run == 5 and math.isfinite(result.best_value)


def read_losses(path):
    with open(path) as f:
        return [(r["train_loss"], r["val_loss"]) for r in csv.DictReader(f)]


def test_same_config_and_seed_give_bit_identical_weights(workdir, tiny):
    tiny["seeds"] = [5]
    first = run(RunConfig.from_dict({**tiny, "group": "a"}))
    second = run(RunConfig.from_dict({**tiny, "group": "b"}))
    other = run(RunConfig.from_dict({**tiny, "group": "c", "seeds": [6]}))
    weights = [torch.load(r.group_dir / str(r.seeds[0].seed) / "model.pt", weights_only=True)
               for r in (first, second, other)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert (read_losses(first.group_dir / "5" / "metrics.csv")
            == read_losses(second.group_dir / "5" / "metrics.csv"))
    assert first.seeds[0].best_value == second.seeds[0].best_value


def test_wandb_offline_runs_are_written_grouped_per_seed(workdir, tiny):
    tiny.update(seeds=[1, 2], wandb={"mode": "offline", "tags": ["smoke"]})
    result = run(RunConfig.from_dict(tiny))
    offline = sorted((workdir / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    for folder in offline:
        (log,) = folder.glob("run-*.wandb")
        assert log.stat().st_size > 0  # what `wandb sync` uploads later
        # The run's config records the group actually used, not the config's null default.
        assert logged_config(folder, "group") == result.group_dir.name
    import wandb
    assert wandb.run is None
    assert len(result.seeds) == 2


def test_wandb_auto_is_offline_without_credentials(workdir, tmp_path, monkeypatch):
    from engine.wandb_run import wandb_mode as _wandb_mode
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    assert _wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert _wandb_mode("auto") == "online"
    assert _wandb_mode("disabled") == "disabled"


def test_wandb_is_closed_when_training_crashes(workdir, tiny):
    import wandb
    tiny["wandb"] = {"mode": "offline", "tags": []}

    def crash(epoch, metrics):
        if epoch == 2:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        run(RunConfig.from_dict(tiny), first_seed_callbacks=[crash])
    assert wandb.run is None  # finished in `finally`
    (seed_dir,) = [p for p in next((workdir / "runs" / "test").iterdir()).iterdir() if p.name == "7"]
    assert '"status": "failed"' in (seed_dir / "result.json").read_text()
    assert len(read_losses(seed_dir / "metrics.csv")) == 2  # every finished epoch was kept


def test_deterministic_runs_use_one_thread_from_the_data_on_and_give_it_back(workdir, tiny, monkeypatch):
    # The data function runs after the determinism settings: every process builds the same data.
    (workdir / "probe.py").write_text(
        "import torch, util\n"
        "threads = []\n"
        "def load(**kwargs):\n"
        "    threads.append(torch.get_num_threads())\n"
        "    return util.load_data(**kwargs)\n")
    monkeypatch.syspath_prepend(str(workdir))
    import probe
    seen = []
    watch = [lambda epoch, metrics: seen.append((torch.get_num_threads(),
                                                 torch.are_deterministic_algorithms_enabled()))]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(RunConfig.from_dict({**tiny, "group": "det", "data": "probe.load",
                                 "trainer": {"deterministic": True}}),
            first_seed_callbacks=watch)
        # one thread and deterministic kernels throughout
        assert probe.threads == [1] and set(seen) == {(1, True)}
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()  # given back
        seen.clear()
        run(RunConfig.from_dict({**tiny, "group": "nodet", "data": "probe.load"}), first_seed_callbacks=watch)
        assert probe.threads == [1, 2] and set(seen) == {(2, False)}
    finally:
        torch.set_num_threads(threads)


def test_the_vector_math_warm_up_covers_every_function_torch_sends_to_mkl():
    # reproducibility.warm_up_vector_math settles oneMKL's first-call choice for each VML function
    # (pytorch/pytorch#188792). The list must follow torch: read it from torch's own header.
    header = Path(torch.__file__).parent / "include" / "ATen" / "cpu" / "vml.h"
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL (e.g. Apple Silicon, aarch64): nothing goes to oneMKL")
    if not header.exists():
        pytest.skip(f"this torch ships no C++ headers ({header} is missing): the list cannot be checked")
    sent_to_mkl = set(re.findall(r"^IMPLEMENT_VML_MKL\((\w+),", header.read_text(), flags=re.M))
    assert {"sin", "cos", "exp", "sqrt", "tanh"} <= sent_to_mkl  # the header was read
    assert sent_to_mkl <= {f.__name__ for f in reproducibility._VECTOR_MATH}


def test_the_warm_up_runs_everywhere_and_does_nothing_without_mkl():
    assert reproducibility.warm_up_vector_math(mkl=False) == 0  # Apple Silicon, aarch64
    assert reproducibility.warm_up_vector_math(mkl=True) == 2 * len(reproducibility._VECTOR_MATH)
    # What this platform does on import: as many calls as its torch has MKL for.
    expected = 2 * len(reproducibility._VECTOR_MATH) if torch.backends.mkl.is_available() else 0
    assert reproducibility.warm_up_vector_math() == expected


def as_if_saved_on_a_gpu(path):
    """Rewrite a torch.save file so that every tensor says it was saved from cuda:0 (as on a
    GPU machine): its pickle names each storage's device as a length-prefixed string."""
    import zipfile
    original = path.with_suffix(".cpu")
    path.rename(original)
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(info, data)
    original.unlink()


def test_a_checkpoint_from_a_gpu_machine_resumes_here(workdir, tiny):
    from engine import checkpoint
    tiny.update(group="g", epochs=3, checkpoint_every_s=0)
    run(RunConfig.from_dict(tiny))
    seed_dir = workdir / "runs" / "test" / "g" / "7"
    state = checkpoint.load(seed_dir / "checkpoint.pt")
    # As a machine with two GPUs writes it: CUDA tensors, and two CUDA generator states.
    state["rng"]["cuda"] = [state["rng"]["torch"].clone(), state["rng"]["torch"].clone()]
    checkpoint.save(seed_dir / "checkpoint.pt", state)
    as_if_saved_on_a_gpu(seed_dir / "checkpoint.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the file really says cuda
            torch.load(seed_dir / "checkpoint.pt", weights_only=True)
    longer = run(RunConfig.from_dict({**tiny, "epochs": 5}), resume=True)
    assert longer.seeds[0].status == "completed" and longer.seeds[0].epochs_run == 5
    loaded = checkpoint.load(seed_dir / "checkpoint.pt")
    assert loaded["rng"]["torch"].device.type == "cpu" and loaded["loss_sum"].device.type == "cpu"
