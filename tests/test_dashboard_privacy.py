"""Optuna Dashboard has no login and can delete studies: where --dashboard is documented and
where it starts, the user is told that 127.0.0.1 is open to every user of a shared machine,
and how to keep the dashboard private (on their own computer)."""
import queue
import re
import signal
import socket
import subprocess
import sys
import threading

import optuna
import pytest

from conftest import ROOT, child_env


def test_the_help_says_who_can_reach_the_dashboard_and_the_private_way():
    help_text = subprocess.run([sys.executable, str(ROOT / "analyze.py"), "--help"], env=child_env(),
                               capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(help_text.split())
    assert "can delete studies" in flat
    assert "every user of this machine can reach 127.0.0.1" in flat  # by --dashboard itself
    assert "`ssh -L 8080:127.0.0.1:8080 login-node` does not change that" in flat
    assert "run the dashboard on your own computer, over a copy of the storage" in flat


def outside_address():
    """This machine's address on its network, or None where it has only loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.slow
def test_the_dashboard_says_so_when_it_starts_and_listens_on_loopback_only(workdir):
    (workdir / "runs" / "test").mkdir(parents=True)
    storage = f"sqlite:///{workdir / 'runs' / 'test' / 'optuna.db'}"
    study = optuna.create_study(study_name="d", storage=storage)
    study.add_trial(optuna.trial.create_trial(value=1.0))
    server = subprocess.Popen([sys.executable, str(ROOT / "analyze.py"), "--study", "d", "--dashboard",
                               "--port", "0"], cwd=workdir, env=child_env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = queue.Queue()  # its lines, read aside: a line that never comes fails the test, not hangs it
        threading.Thread(target=lambda: [said.put(line) for line in server.stdout], daemon=True).start()
        lines = [said.get(timeout=60) for _ in range(4)]
        (port,) = re.findall(r"http://127\.0\.0\.1:(\d+)/dashboard/studies/\d+", "".join(lines))
        assert lines[3] == (f"It has no login: every user of this machine can reach port {port} and delete "
                            "studies. On a shared machine, run it on your own computer "
                            "(python analyze.py --help).\n")
        address = outside_address()
        if address:  # from another machine it cannot be reached at all
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, int(port)), timeout=5).close()
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()  # from this one, it can
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
