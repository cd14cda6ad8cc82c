"""A real single-node SLURM cluster in a temporary folder, for the tests of `cdgrad run --executor slurm`.

Debian's slurmctld, slurmd and munge are started by hand (nothing starts by itself in a container): all state,
sockets, logs and the configuration live in one folder, the ports are free ones picked at start, accounting is
off (as on many real clusters: `sacct` fails). The scheduler runs every second (`bf_interval=1`,
`sched_interval=2`) and credentials expire after 10 s (a requeued job waits that long before it starts again).
`SLURM_CONF` points the clients (sbatch, squeue, scontrol, scancel) and every job at it.

`SlurmCluster.unavailable()` says why no cluster can be started here (binaries missing, not root, no submitit),
or None.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


class SlurmCluster:
    """Start with `start()` (about 1 s until the node is idle), stop with `stop()` (about 5 s)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cdgrad-slurm-", dir="/tmp"))
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @staticmethod
    def unavailable() -> str | None:
        missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
        if missing:
            return f"SLURM or munge is not installed (missing {', '.join(missing)}; Debian: slurmctld slurmd " \
                "slurm-client munge)"  # fmt: skip
        if os.geteuid() != 0:
            return "starting slurmctld, slurmd and munged for a test cluster needs root"
        try:
            import submitit  # noqa: F401
        except ImportError:
            return "submitit is not installed"
        return None

    def _write_config(self) -> None:
        t, host = self.root, socket.gethostname().split(".")[0]
        settings = {
            "ClusterName": "cdgradtest",
            "SlurmctldHost": f"{host}(127.0.0.1)",
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={t}/run/munge.sock,cred_expire=10",
            "AccountingStorageType": "accounting_storage/none",
            "StateSaveLocation": f"{t}/spool/ctld",
            "SlurmdSpoolDir": f"{t}/spool/d",
            "SlurmctldPidFile": f"{t}/run/slurmctld.pid",
            "SlurmdPidFile": f"{t}/run/slurmd.pid",
            "SlurmctldLogFile": f"{t}/log/slurmctld.log",
            "SlurmdLogFile": f"{t}/log/slurmd.log",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "MailProg": "/bin/true",
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "bf_interval=1,sched_interval=2",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "ReturnToService": 2,
            "KillWait": 5,
            "MinJobAge": 600,
        }
        lines = [f"{k}={v}" for k, v in settings.items()]
        lines.append(f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=2000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 60.0) -> None:
        t = self.root
        for sub in ("etc", "key", "run", "log", "spool/ctld", "spool/d"):
            (t / sub).mkdir(parents=True, exist_ok=True)
        t.chmod(0o755)  # munged refuses a socket in a folder that is not a+x
        (t / "run").chmod(0o755)
        (t / "key").chmod(0o700)
        key = t / "key" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self._write_config()
        self._run(
            _which("munged"),
            f"--socket={t}/run/munge.sock",
            f"--key-file={key}",
            f"--pid-file={t}/run/munged.pid",
            f"--log-file={t}/log/munged.log",
            f"--seed-file={t}/key/munged.seed",
        )
        self._run(_which("slurmctld"), "-f", str(self.conf))
        self._run(_which("slurmd"), "-f", str(self.conf))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=30)
            if out.stdout.strip() == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the test cluster's node did not become idle in {timeout_s} s; logs in {t}/log")

    def _run(self, *argv: str | None) -> None:
        subprocess.run([str(a) for a in argv], env=self.env, check=True, capture_output=True, timeout=60)

    def jobs(self) -> dict[str, str]:
        """{job id: state} of every queued job (array tasks one by one)."""
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i|%T"], env=self.env, capture_output=True, text=True, timeout=30
        )
        return dict(line.split("|", 1) for line in out.stdout.split())

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--quiet", "--user=root"], env=self.env, capture_output=True, timeout=30)
        time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            self._kill(self.root / "run" / f"{name}.pid")
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _kill(pidfile: Path, wait_s: float = 10.0) -> None:
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
