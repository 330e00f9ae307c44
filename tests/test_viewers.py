"""The ecosystem's own viewers on the template's folders, used as a person would: `wandb leet`
under tmux, Optuna Dashboard in headless chromium, and the `wandb sync` command for a group."""
import html
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import analyze
from config import OptimizeConfig, RunConfig
from conftest import ROOT, child_env, logged_config, run_main, skip_or_fail, write_yaml
from engine.run import run
from engine.search import run_study

LR = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}


def tiny_study(tiny, name: str, trials: int = 2):
    tiny["epochs"] = 2
    opt = OptimizeConfig.from_dict({"trials": trials, "seed": 0, "study_name": name, "pruner": None,
                                    "search_space": LR})
    return run_study(RunConfig.from_dict(tiny), opt)


def tool(name: str, variable: str) -> str:
    found = shutil.which(name)
    if found is None:
        skip_or_fail(f"{name} not found; .ci/run installs Debian's {name}", variable)
    return found


def test_a_trials_wandb_runs_name_the_group_seed_study_and_trial(workdir, tiny):
    tiny.update(seeds=[1, 2], wandb={"mode": "offline", "tags": []})
    tiny_study(tiny, "labelled", trials=1)
    folders = sorted((workdir / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    assert {logged_config(f, "seed") for f in folders} == {1, 2}
    for folder in folders:
        assert logged_config(folder, "group") == "labelled_t0000"
        assert logged_config(folder, "study") == "labelled" and logged_config(folder, "trial") == 0
        data = next(folder.glob("run-*.wandb")).read_bytes()
        # The epoch is wandb's step, not a metric of its own: no history or summary item has that
        # key (an item is the key, length-prefixed in protobuf field 1 or 2, then its JSON value).
        assert b"\x12\x08val_loss\x82\x01" in data and not re.search(rb"[\n\x12]\x05epoch\x82\x01", data)


@pytest.mark.slow
def test_wandb_leet_shows_the_seed_runs_and_val_loss(workdir, tiny, monkeypatch):
    tmux = tool("tmux", "REQUIRE_TMUX")
    monkeypatch.delenv("WANDB_DIR")  # where the README points `wandb leet`: beside the run
    tiny.update(seeds=[1, 2], wandb={"mode": "offline", "tags": []})
    # Trained as a person would, in a process that ends (this one's wandb service lives on).
    assert run_main("--run_config", str(write_yaml(workdir / "c.yaml", tiny)), cwd=workdir).returncode == 0
    (group_dir,) = (workdir / "runs" / "test").iterdir()
    ids = [(group_dir / seed / "wandb_id").read_text() for seed in ("1", "2")]
    server = ["-L", f"leet-test-{workdir.name}"]  # a tmux server of its own, stopped below
    command = shlex.join([sys.executable, "-m", "wandb", "leet", f"runs/test/{group_dir.name}/wandb"])
    subprocess.run([tmux, *server, "new-session", "-d", "-x", "200", "-y", "50", command], cwd=workdir,
                   env=child_env(), check=True)
    try:
        screen, deadline = "", time.monotonic() + 60
        while time.monotonic() < deadline and not (all(i in screen for i in ids) and "val_loss" in screen):
            time.sleep(0.5)
            screen = subprocess.run([tmux, *server, "capture-pane", "-p"], capture_output=True,
                                    text=True).stdout
    finally:
        subprocess.run([tmux, *server, "kill-server"], capture_output=True)
    assert all(i in screen for i in ids), screen  # both seeds' runs in the list
    assert "│val_loss" in screen and "│train_loss" in screen, screen  # their charts
    assert "│epoch " not in screen, screen  # the epoch is the x axis, not a chart
    assert re.search(rf"Name: {group_dir.name}/[12]\b", screen), screen


@pytest.mark.slow
def test_the_dashboard_shows_the_study_in_a_browser(workdir, tiny):
    chromium = tool("chromium", "REQUIRE_CHROMIUM")
    tiny_study(tiny, "browsed")
    server = subprocess.Popen([sys.executable, str(ROOT / "analyze.py"), "--study", "browsed", "--dashboard",
                               "--port", "0"], cwd=workdir, env=child_env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [server.stdout.readline() for _ in range(3)]
        (address,) = re.findall(r"http://127\.0\.0\.1:\d+/dashboard/studies/\d+", "".join(lines))
        page = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                               f"--user-data-dir={workdir / 'chromium'}", "--virtual-time-budget=15000",
                               "--dump-dom", f"{address}/trials"],
                              capture_output=True, text=True, timeout=120).stdout
        text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))
        assert "browsed (id=" in text and "2 Trials" in text, text[:2000]
        server.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.wait(timeout=30) == 0
        assert server.stderr.read() == ""  # no traceback, no line per request
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_busy_port_is_one_line(workdir, tiny, capsys):
    tiny_study(tiny, "busy", trials=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        capsys.readouterr()
        assert analyze.main(["--study", "busy", "--dashboard", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --port: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_sync_runs_wandb_sync_over_the_groups_offline_runs(workdir, tiny, capsys):
    tiny.update(seeds=[1, 2], wandb={"mode": "offline", "tags": []})
    group_dir = run(RunConfig.from_dict(tiny)).group_dir
    run(RunConfig.from_dict({**tiny, "group": "other"}))  # its runs share WANDB_DIR, and stay out
    ids = [(group_dir / seed / "wandb_id").read_text() for seed in ("1", "2")]
    ours = sorted(p for p in (workdir / "wandb_dir" / "wandb").glob("offline-run-*") if p.name[-8:] in ids)
    assert len(ours) == 2 and len(list((workdir / "wandb_dir" / "wandb").glob("offline-run-*"))) == 4
    capsys.readouterr()
    assert analyze.main(["--sync", "--project", "test", "--group", group_dir.name, "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip()
    assert shlex.split(printed) == [sys.executable, "-m", "wandb", "sync", *map(str, ours)]


@pytest.mark.parametrize("args,line", [
    (["--sync", "--project", "test", "--group", "nope"],
     "error: runs/test/nope: is not a run folder (runs/<project>/<group>/ with a config.yaml)"),
    (["--sync", "--project", "test"], "error: --sync: give --project and --group"),
    (["--study", "nope", "--dashboard"],
     "error: --study: no study 'nope' in runs/ (no optuna.db or optuna.journal found)"),
    (["--port", "8080"], "error: --port: only --dashboard uses it"),
    (["--dashboard"], "error: --dashboard: only --study uses it"),
    (["--dry-run"], "error: --dry-run: only --sync uses it"),
])
def test_bad_viewer_arguments_are_one_line(workdir, capsys, args, line):
    assert analyze.main(args) == 2
    assert capsys.readouterr().err == line + "\n"
    assert not (workdir / "runs").exists()


def test_sync_needs_offline_runs(workdir, tiny, capsys):
    group_dir = run(RunConfig.from_dict(tiny)).group_dir  # wandb disabled
    capsys.readouterr()
    assert analyze.main(["--sync", "--project", "test", "--group", group_dir.name]) == 2
    assert capsys.readouterr().err == f"error: {group_dir}: holds no offline wandb run\n"
