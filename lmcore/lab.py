"""Running the chapters yourself: ``python -m lmcore.lab [folder]`` (``make lab``) starts JupyterLab.

The server listens on a free local port (127.0.0.1 only), opens ``folder`` (default ``book/``)
with this environment's ``python3`` kernel, and prints the URL with its token. Ctrl-C stops it
and the kernels it started. :class:`Lab` is the same server as an object, for tests and scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


class Lab:
    """A JupyterLab server on a free local port, serving ``folder``; ``url`` is known once started."""

    def __init__(self, folder: str | os.PathLike, token: str | None = None, browser: bool = False,
                 log=subprocess.DEVNULL, settings: str | os.PathLike | None = None):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ValueError(f"folder={os.fspath(folder)!r} is not a folder; expected one holding notebooks")
        self.runtime = tempfile.mkdtemp(prefix="lmcore-lab-")
        command = [sys.executable, "-m", "jupyterlab", str(self.folder), "--ServerApp.ip=127.0.0.1",
                   "--ServerApp.port=0", "--ServerApp.port_retries=0",
                   f"--ServerApp.open_browser={browser}",
                   "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI machines often run as root
            command.append("--ServerApp.allow_root=True")
        if token is not None:
            command.append(f"--IdentityProvider.token={token}")
        if settings is not None:  # a private settings and workspaces folder (tests; a clean layout)
            command += [f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={settings}",
                        "--LabApp.expose_app_in_browser=True"]
        share = Path(sys.prefix) / "share" / "jupyter"  # this environment's kernel is "python3"
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=self.runtime,
                   JUPYTER_PATH=os.pathsep.join(filter(None, [str(share), os.environ.get("JUPYTER_PATH")])))
        # its own session: Ctrl-C reaches this process, which shuts the server down in order
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        self.info = self._wait_for_server()
        self.url = f"{self.info['url'].rstrip('/')}/lab?token={self.info['token']}"

    def _wait_for_server(self, timeout: float = 120) -> dict:
        """The server's runtime file (port, token, url), once it answers on its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.process.returncode} before it started")
            for path in Path(self.runtime).glob("jpserver-*.json"):
                try:
                    return json.loads(path.read_text())
                except json.JSONDecodeError:  # being written
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"JupyterLab did not start within {timeout:.0f} s")

    def api(self, path: str, method: str = "GET") -> bytes:
        request = urllib.request.Request(f"{self.info['url'].rstrip('/')}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.info['token']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def stop(self, timeout: float = 30) -> int:
        """Shut the server and its kernels down (the server's own shutdown, then SIGTERM, then SIGKILL)."""
        if self.process.poll() is None and getattr(self, "info", None):
            try:
                self.api("shutdown", method="POST")
            except OSError:
                pass
        try:
            for signal in (None, self.process.terminate, self.process.kill):
                if signal is not None and self.process.poll() is None:
                    signal()
                try:
                    return self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    continue
            return self.process.wait()
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcore.lab", description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="book", help="the folder of notebooks to open (book/)")
    parser.add_argument("--no-browser", action="store_true", help="only print the URL")
    args = parser.parse_args(argv)
    try:
        lab = Lab(args.folder, browser=not args.no_browser, log=None)
    except ValueError as err:
        parser.error(str(err))
    print(f"\nJupyterLab is serving {lab.folder} at\n\n    {lab.url}\n\nCtrl-C stops it.", flush=True)
    try:
        lab.process.wait()
    except KeyboardInterrupt:
        print("stopping JupyterLab", flush=True)
    finally:
        lab.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
