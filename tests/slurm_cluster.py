"""A real single-node Slurm cluster on localhost for the scale-out tests: Debian's slurmctld, slurmd
and slurmdbd (submitit reads job states with `sacct`, which needs the accounting daemon) over a
private MariaDB, with munge, from a generated slurm.conf holding this machine's CPUs and memory
and one partition; every port free and every file in a temporary folder. `make install` installs
the packages (root; the machine kind CI and sessions run as). Stopped and removed at the end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLUSTER, PARTITION = "pipelinetest", "debug"
DB_USER, DB_PASSWORD = "slurm", "slurm-test-only"  # a throwaway database on the loopback address


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, ready, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"slurm test cluster: {what} did not come up in {seconds:g} s")
        time.sleep(0.2)


def answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def munge_running() -> bool:
    return subprocess.run(["munge", "-n"], capture_output=True).returncode == 0


@contextmanager
def slurm_cluster(root: Path, cpus: int | None = None) -> Iterator[dict]:
    """Start the cluster under `root` (its node offering `cpus`, default this machine's); yields
    {"env": the variables a client needs (SLURM_CONF), "seconds": how long it took to start}.
    Everything it started is stopped on exit."""
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    for d in ("db", "state", "spool", "log"):
        (root / d).mkdir(exist_ok=True)
    ports = {k: free_port() for k in ("mysql", "dbd", "ctld", "slurmd")}
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    started: list[subprocess.Popen | Path] = []  # processes, or pid files of daemons
    try:
        if not munge_running():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            wait_for("munged", munge_running)
            started.append(Path("/run/munge/munged.pid"))
        subprocess.run(["mariadb-install-db", "--user=root", f"--datadir={root / 'db'}",
                        "--auth-root-authentication-method=socket"], check=True,
                       capture_output=True)
        sock = root / "mysql.sock"
        started.append(subprocess.Popen(
            ["mariadbd", "--user=root", f"--datadir={root / 'db'}", f"--socket={sock}",
             f"--port={ports['mysql']}", "--bind-address=127.0.0.1", "--skip-log-error",
             f"--pid-file={root / 'mysql.pid'}"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        wait_for("mariadbd", lambda: answers(ports["mysql"]))
        subprocess.run(["mariadb", "-S", str(sock), "-u", "root", "-e",
                        f"CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}'; "
                        f"GRANT ALL ON slurm_acct_db.* TO '{DB_USER}'@'127.0.0.1';"], check=True)
        write_configs(root, ports, cpus or os.cpu_count() or 1)
        subprocess.run(["slurmdbd"], env=env, check=True)
        started.append(root / "slurmdbd.pid")
        wait_for("slurmdbd", lambda: answers(ports["dbd"]))
        subprocess.run(["sacctmgr", "-i", "add", "cluster", CLUSTER], env=env, check=True,
                       capture_output=True)
        subprocess.run(["slurmctld"], env=env, check=True)
        started.append(root / "slurmctld.pid")
        subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True)
        started.append(root / "slurmd.pid")
        wait_for("the node", lambda: "idle" in subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout)
        yield {"env": {"SLURM_CONF": env["SLURM_CONF"]}, "seconds": time.perf_counter() - t0}
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        for s in reversed(started):
            stop(s)


def stop(what: subprocess.Popen | Path) -> None:
    """Stop a process we started, or the daemon whose pid file this is, and wait for it."""
    if isinstance(what, subprocess.Popen):
        what.terminate()
        try:
            what.wait(timeout=30)
        except subprocess.TimeoutExpired:
            what.kill()
        return
    try:
        pid = int(what.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def write_configs(root: Path, ports: dict[str, int], cpus: int) -> None:
    """slurm.conf (`cpus` CPUs and 80% of this machine's memory, one partition) and
    slurmdbd.conf."""
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    log = root / "log"
    (root / "slurmdbd.conf").write_text(f"""AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports['dbd']}
SlurmUser=root
LogFile={log / 'slurmdbd.log'}
PidFile={root / 'slurmdbd.pid'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mysql']}
StorageUser={DB_USER}
StoragePass={DB_PASSWORD}
StorageLoc=slurm_acct_db
""")
    (root / "slurmdbd.conf").chmod(0o600)
    (root / "slurm.conf").write_text(f"""ClusterName={CLUSTER}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports['ctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports['dbd']}
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
