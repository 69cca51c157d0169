"""One local Ray cluster per test session, started like a user would: `ray start --head`.

Serve tests, Tune tests and `ray job submit` tests all use it. Every port is chosen free and the
temp dir is private, so several sessions (or a developer's own cluster) can run beside it;
`stop()` kills only this cluster's processes (`ray stop` would kill every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    def __init__(self, temp_dir: str, ports: dict[str, int]):
        self.temp_dir = temp_dir
        self.ports = ports
        self.address = f"127.0.0.1:{ports['port']}"  # GCS address, for ray.init(address=...)
        self.dashboard_url = f"http://127.0.0.1:{ports['dashboard-port']}"  # for `ray job submit --address`

    @classmethod
    def start(cls, num_cpus: int = 16) -> "RayCluster":
        # Ray 2.60 turns on token auth for `ray start`; a throwaway local test cluster opts out, and
        # the env is inherited by the driver, `ray job submit` and the job's own driver alike.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        temp_dir = tempfile.mkdtemp(prefix="crt-", dir="/tmp")  # short: Ray's socket paths have a length limit
        ports = {flag: free_port() for flag in PORT_FLAGS}
        cmd = [
            "ray", "start", "--head", f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", *(f"--{flag}={port}" for flag, port in ports.items()),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start --head` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        cluster = cls(temp_dir, ports)
        cluster.wait_for_jobs_api()
        return cluster

    def wait_for_jobs_api(self, timeout_s: float = 60) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{self.dashboard_url}/api/version", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray dashboard at {self.dashboard_url} did not come up in {timeout_s} s")
            time.sleep(0.5)

    def stop(self) -> None:
        import psutil

        marks = (self.temp_dir, f":{self.ports['port']}")
        for _ in range(3):
            victims = []
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    line = " ".join(proc.info["cmdline"] or [])
                except psutil.Error:
                    continue
                if proc.pid != os.getpid() and any(mark in line for mark in marks):
                    victims.append(proc)
                    try:  # agents and workers are renamed `ray::…`: take them as the raylet's children
                        victims.extend(proc.children(recursive=True))
                    except psutil.Error:
                        pass
            if not victims:
                break
            for proc in victims:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(victims, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
