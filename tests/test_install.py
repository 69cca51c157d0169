"""The install a new user gets: a non-editable `pip install .` works from any directory (the configs
ship inside the package), `pip check` stays clean, and `collab-ray demo` narrates instead of
printing Ray's noise. Each test runs the CLI in a subprocess with a Ray of its own."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_ray_env() -> dict:
    """This environment without the test session's Ray cluster: the CLI starts and stops its own."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv (reusing the installed dependencies) with collab_ray installed non-editable from a copy
    of the source (so no build files land in the checkout); returns its bin directory."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(ROOT / "collab_ray", src / "collab_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = tmp / "venv"
    # no pip/setuptools of its own: the venv uses the installed ones (a fresh venv's setuptools is too old to build)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-build-isolation", str(src)], check=True, cwd=tmp)
    return venv / "bin"


def test_non_editable_install_is_used_and_pip_check_is_clean(installed, tmp_path):
    where = subprocess.run([str(installed / "python"), "-c", "import collab_ray.configs as c; print(c.HERE)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)  # fmt: skip
    here = Path(where.stdout.strip())
    assert str(installed.parent) in str(here) and (here / "demo.yaml").is_file() and (here / "routers" / "demo.npz").is_file()
    check = subprocess.run([str(installed / "python"), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_serve_tiny_from_a_temporary_directory_answers(installed, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [str(installed / "collab-ray"), "serve", "tiny", "--port", str(port), "--host", "127.0.0.1"],
        cwd=tmp_path, env=own_ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline, body = time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                body = post(f"http://127.0.0.1:{port}/v1/completions", {"model": "target", "prompt": "The river", "max_tokens": 4, "temperature": 0})
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        assert body is not None, f"no answer (exit {proc.poll()})"
        assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] <= 4
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve_forever shuts Serve down on Ctrl-C
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_demo_narrates_and_keeps_ray_out_of_the_terminal(tmp_path):
    log = tmp_path / "ray.log"
    proc = subprocess.run(
        [sys.executable, "-m", "collab_ray.cli", "demo", "--config", "tiny", "--pipelines", "speculative,vote",
         "--max-tokens", "4", "--log", str(log)],
        cwd=tmp_path, env=own_ray_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert f"Ray's own output goes to {log}" in out and "ready: target" in out and "ready: draft" in out
    for i, name in ((1, "speculative"), (2, "vote")):
        assert f"[{i}/2]" in out and f"{name} ({name})" in out
    assert out.count("  Q: ") == 4 and out.count("  A: ") == 4 and "models: " in out
    assert "Started a local Ray instance" not in out + proc.stderr and "WARNING" not in out + proc.stderr
    assert "Started a local Ray instance" in log.read_text()
