"""A run folder from someone else runs no code of its choosing: the import paths its config.yaml
names must lie in this project's own files or torch.nn, torch.optim, optuna.samplers,
optuna.pruners, unless the user trusts the folder (analyze.py --trust, load_run(trust=True)).
A config the user passes to main.py is theirs and may name any installed package."""
import subprocess
import sys
import time

import pytest

import analyze
from config import RunConfig, load_yaml
from conftest import ROOT, child_env, write_yaml
from engine.errors import ConfigError
from engine.folders import untrusted
from engine.resolve import resolve
from engine.trust import Refused
from engine.run import run

SHELL = {"args": "touch PWNED", "shell": True}


def trained_group(tiny, **changes):
    """A real trained group whose saved config.yaml is then changed, as a shared folder may be."""
    group_dir = run(RunConfig.from_dict(tiny)).group_dir
    write_yaml(group_dir / "config.yaml", {**load_yaml(group_dir / "config.yaml"), **changes})
    return group_dir


def files_in(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow
def test_analyze_refuses_a_shell_command_named_by_a_run_folder_unless_trusted(workdir, tiny):
    group_dir = trained_group(tiny, data="subprocess.run", data_config=SHELL)
    command = [sys.executable, str(ROOT / "analyze.py"), "--project", "test", "--group", group_dir.name]
    before = files_in(workdir)
    done = subprocess.run(command, cwd=workdir, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"error: runs/test/{group_dir.name}/config.yaml: data: refusing 'subprocess.run' "
                           "from a run folder: it is outside this project and the allowed packages; "
                           "pass --trust if you trust this folder\n")
    assert not (workdir / "PWNED").exists() and files_in(workdir) == before  # nothing run, nothing written
    # Trusted, the folder's data function runs: the shell command creates the file, and its
    # CompletedProcess is then refused as data, in one line.
    done = subprocess.run(command + ["--trust"], cwd=workdir, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert (workdir / "PWNED").exists()
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "data: subprocess.run must return (train_dataset, val_dataset), got CompletedProcess" \
        in done.stderr


def test_load_run_refuses_a_model_that_starts_a_process_unless_trusted(workdir, tiny):
    group_dir = trained_group(tiny, net="subprocess.Popen", net_config=SHELL)
    with pytest.raises(ConfigError) as refused:
        analyze.load_run(group_dir)
    assert str(refused.value) == (f"{group_dir}/config.yaml: net: refusing 'subprocess.Popen' from a run "
                                  "folder: it is outside this project and the allowed packages; pass "
                                  "trust=True to load_run if you trust this folder")
    time.sleep(0.5)  # a started shell would have touched the file by now
    assert not (workdir / "PWNED").exists()
    with pytest.raises(AttributeError):  # trusted: Popen is built as the model, then has no .to()
        analyze.load_run(group_dir, trust=True)
    deadline = time.monotonic() + 10
    while not (workdir / "PWNED").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (workdir / "PWNED").exists()


def test_a_study_refuses_its_best_run_folder_before_writing_its_report(workdir, tiny, capsys):
    from config import OptimizeConfig
    from engine.search import run_study
    tiny["epochs"] = 2
    opt = OptimizeConfig.from_dict({"trials": 1, "seed": 0, "study_name": "s", "pruner": None,
                                    "search_space": {"optimizer_config": {
                                        "lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}})
    study = run_study(RunConfig.from_dict(tiny), opt)
    best_dir = workdir / study.best_trial.user_attrs["run_dir"]
    write_yaml(best_dir / "config.yaml", {**load_yaml(best_dir / "config.yaml"), "data": "subprocess.run",
                                          "data_config": SHELL})
    before = files_in(workdir)
    assert analyze.main(["--study", "s"]) == 2
    assert "data: refusing 'subprocess.run' from a run folder" in capsys.readouterr().err
    assert files_in(workdir) == before
    assert analyze.main(["--study", "s", "--trust"]) == 2  # trusted: the data function runs
    assert (workdir / "PWNED").exists()


# What a shared folder's config legitimately names, and what it must not.
ACCEPTED = ["model.MLP", "util.load_data", "util.accuracy", "torch.optim.AdamW", "torch.nn.MSELoss",
            "torch.nn.functional.mse_loss", "torch.nn.functional.gelu", "torch.optim.lr_scheduler.StepLR",
            "optuna.samplers.TPESampler", "optuna.pruners.MedianPruner", "engine.pruner.PFLPruner",
            "mymodels.Net"]
REFUSED = {
    "os.system": "it is outside this project and the allowed packages",
    "subprocess.run": "it is outside this project and the allowed packages",
    "builtins.eval": "it is outside this project and the allowed packages",
    "shutil.rmtree": "it is outside this project and the allowed packages",
    "pickle.loads": "it is outside this project and the allowed packages",
    "torch.load": "it is outside this project and the allowed packages",
    "torch.hub.load": "it is outside this project and the allowed packages",
    "numpy.load": "it is outside this project and the allowed packages",
    "torch.utils.cpp_extension.load": "it is outside this project and the allowed packages",
    "torch.nn.functional.torch.load": "it reaches module 'torch' through 'torch.nn.functional'",
    "model.torch.load": "it reaches module 'torch' through 'model'",
    "util.TensorDataset": "it is torch.utils.data.dataset.TensorDataset, outside this project and the "
                          "allowed packages",
    "mymodels.run": "it is subprocess.run, outside this project and the allowed packages",
    "torch.optim.lr_scheduler.bisect_right": "it is _bisect.bisect_right, outside this project and the "
                                             "allowed packages",
    "model.MLP.__init__": "it names a private attribute",
    "torch.nn.Module.__init__": "it names a private attribute",
    "engine.checkpoint.write_text": "it is the template's machinery, which a config does not name",
    "main.main": "it is the template's machinery, which a config does not name",
    "analyze.sync": "it is the template's machinery, which a config does not name",
    "runs.p.g.shipped.load": "it is code that came with the run folder",
}


@pytest.fixture
def places(workdir, monkeypatch):
    """A run folder at runs/p/g, the user's own module in the current folder (which main.py and
    analyze.py put on sys.path), and the folder's own guard."""
    monkeypatch.syspath_prepend(str(workdir))
    (workdir / "mymodels.py").write_text("from subprocess import run\n\nclass Net:\n    pass\n")
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)  # this test's, not the last one's
    folder = workdir / "runs" / "p" / "g"
    folder.mkdir(parents=True)
    return folder, untrusted(folder)


@pytest.mark.parametrize("path", ACCEPTED)
def test_what_a_shared_config_names_is_accepted(places, path):
    assert resolve(path, places[1]) is resolve(path)


@pytest.mark.parametrize("path", REFUSED)
def test_what_runs_code_of_the_folders_choosing_is_refused(places, path):
    folder, untrusted = places
    (folder / "shipped.py").write_text("open('IMPORTED', 'w').close()\n")
    with pytest.raises(Refused) as refused:
        resolve(path, untrusted)
    assert str(refused.value) == (f"refusing {path!r} from a run folder: {REFUSED[path]}; "
                                  "pass --trust if you trust this folder")
    assert not (folder.parents[2] / "IMPORTED").exists() and "runs" not in sys.modules


def test_nothing_outside_is_imported_to_check_it(places, tmp_path_factory, monkeypatch):
    """An installed package that does something on import is refused before it is imported; the
    user's own config (no Untrusted) still names it, as main.py --run_config does."""
    site = tmp_path_factory.mktemp("site-packages")  # neither the template's folder nor the current one
    (site / "sideeffect.py").write_text(f"open({str(site / 'IMPORTED')!r}, 'w').close()\nrun = print\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(Refused, match="outside this project"):
        resolve("sideeffect.run", places[1])
    assert not (site / "IMPORTED").exists() and "sideeffect" not in sys.modules
    assert resolve("sideeffect.run") is print and (site / "IMPORTED").exists()
    del sys.modules["sideeffect"]


def test_a_notebook_inside_the_run_folder_imports_nothing_it_ships(places, monkeypatch):
    """With the current folder inside the run folder (a notebook opened there), Python would
    import the folder's own model.py: every path is refused."""
    folder, untrusted = places
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    with pytest.raises(Refused, match=f"Python imports from {folder}, which came with the run folder"):
        resolve("torch.nn.MSELoss", untrusted)


def test_a_copied_in_group_is_compared_on_resume_without_importing_it(workdir, tiny, monkeypatch):
    """main.py --resume reads saved configs back (the group's own, and its siblings' for the
    hint): only to compare, so a folder copied into runs/ runs nothing it ships."""
    monkeypatch.syspath_prepend(str(workdir))  # as main.py does
    for group in ("copied", "mine"):
        folder = workdir / "runs" / "test" / group
        folder.mkdir(parents=True)
        (folder / "payload.py").write_text("open('PWNED', 'w').close()\ndef load(): pass\n")
        write_yaml(folder / "config.yaml",
                   {**tiny, "group": group, "data": f"runs.test.{group}.payload.load", "data_config": {}})
    with pytest.raises(ConfigError, match="nothing to resume .* the nearest, copied, differs in data"):
        run(RunConfig.from_dict({**tiny, "group": "other"}), resume=True)
    with pytest.raises(ConfigError, match="a different config .differs in data, data_config"):
        run(RunConfig.from_dict({**tiny, "group": "mine"}), resume=True)
    assert not (workdir / "PWNED").exists()


def test_the_users_own_config_may_name_an_installed_package(workdir, tiny, tmp_path_factory, monkeypatch):
    """The guard is for configs read from run folders: training and resuming with a model from
    a pip-installed package keeps working."""
    site = tmp_path_factory.mktemp("site-packages")
    (site / "mylib.py").write_text((ROOT / "model.py").read_text())
    monkeypatch.syspath_prepend(str(site))
    tiny.update(net="mylib.MLP", epochs=2)
    first = run(RunConfig.from_dict(tiny))
    assert first.values
    again = run(RunConfig.from_dict({**tiny, "epochs": 3}), resume=True)
    assert again.seeds[0].epochs_run == 3  # resumed: its saved config was compared, not refused
    with pytest.raises(ConfigError, match="net: refusing 'mylib.MLP'"):
        analyze.load_run(first.group_dir)
    assert set(analyze.load_run(first.group_dir, trust=True).models) == {7}


def test_trust_is_never_silently_ignored(workdir, capsys):
    assert analyze.main(["--sync", "--project", "p", "--group", "g", "--trust"]) == 2
    assert capsys.readouterr().err == "error: --trust: only the analysis of a run folder uses it\n"
