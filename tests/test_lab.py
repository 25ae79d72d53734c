"""`make lab` (python -m lmcore.lab): JupyterLab on a free local port, its URL printed, Ctrl-C stops everything."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

pytest.importorskip("jupyterlab")


def test_lab_prints_a_working_url_and_ctrl_c_stops_the_server_and_its_kernels(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "lmcore.lab", str(tmp_path), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        for line in proc.stdout:  # the server's own log goes to stderr; the URL is printed on stdout
            m = re.search(r"(http://127\.0\.0\.1:(\d+))/lab\?token=(\S+)", line)
            if m:
                base, port, token = m.group(1), int(m.group(2)), m.group(3)
                break
        assert m, "python -m lmcore.lab printed no URL"
        assert port > 0
        headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
        with urllib.request.urlopen(urllib.request.Request(f"{base}/api/status", headers=headers)) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError, match="403"):  # the token is required
            urllib.request.urlopen(f"{base}/api/kernels", data=b"{}")
        request = urllib.request.Request(f"{base}/api/kernels", data=json.dumps({"name": "python3"}).encode(),
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request) as r:
            assert json.loads(r.read())["name"] == "python3"
        processes = psutil.Process(proc.pid).children(recursive=True)  # the server and the kernel
        assert len(processes) >= 2, processes
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.is_running() for p in processes):
            time.sleep(0.1)
        assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_lab_refuses_a_folder_that_does_not_exist(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lmcore.lab", str(tmp_path / "missing"), "--no-browser"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "missing' is not a folder" in done.stderr.strip().splitlines()[-1]
