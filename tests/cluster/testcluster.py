"""A private one-node SLURM cluster (with accounting) for kdexp's tests, and for trying kdexp's
SLURM route without a cluster.

Usage:
    eval "$(python tests/cluster/testcluster.py start --dir /tmp/kdexp-slurm [--cpus 8])"
    python tests/cluster/testcluster.py status --dir /tmp/kdexp-slurm
    python tests/cluster/testcluster.py stop --dir /tmp/kdexp-slurm

`start` prints the two exports that point SLURM's commands at the cluster (SLURM_CONF) and kdexp at
its launcher configs: this folder is a site dir (KDEXP_SITE_DIR, as a user's own), whose
hydra/launcher/slurm_local.yaml (and slurm_local_shared.yaml) fit the cluster. Or as a library:
``info = start(dir)``, then ``SLURM_CONF=info.slurm_conf`` and ``KDEXP_SITE_DIR=SITE_DIR`` in the
environment, ..., ``stop(dir)`` (the tests: tests/slurm/conftest.py).

Every daemon (munged, mariadbd, slurmdbd, slurmctld, slurmd) runs in the foreground of its own
session with all state under ``dir`` and free TCP ports, so it neither touches the system's
/etc/slurm nor collides with another test cluster. ``stop`` kills exactly the PIDs recorded at
start (checked against their start time, so a recycled PID is never hit) and wipes the state.
Needs root: slurmd must run jobs as the submitting user. See /work/shared/slurm-notes.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

CLUSTER_NAME = "kdexp"
PARTITION = "a100"
GPU_TYPE = "a100"
GPUS = 4
SHARDS_PER_GPU = 4  # gres/shard: jobs of hydra/launcher=slurm_local_shared share a GPU
PACKAGES = "slurm-wlm munge slurmdbd mariadb-server"
APT_COMMAND = f"apt-get update && apt-get install -y --no-install-recommends {PACKAGES}"
INSTALL_HINT = f"run `tests/cluster/install_slurm.sh` as root, or `make slurm-deps` (it runs: {APT_COMMAND})"
# This folder holds the cluster's launcher configs (hydra/launcher/slurm_local*.yaml): kdexp reaches
# them as it reaches any site's, with KDEXP_SITE_DIR pointing here.
SITE_DIR = Path(__file__).resolve().parent
# what start() and the tests run; the daemons live in /usr/sbin, not always on a user's PATH
BINARIES = ("munged", "munge", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld",
            "slurmd", "sbatch", "squeue", "scancel", "sinfo", "sacct", "sacctmgr", "scontrol")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")  # start order
STATE_FILE = "cluster.json"
# everything start() creates inside dir; stop() removes exactly these
OWNED = ("munge", "munge-key", "etc", "dev", "db", "state", "log", "pids", STATE_FILE)
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


class ClusterError(RuntimeError):
    """The test cluster could not be started, queried or stopped."""


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    dir: Path
    slurm_conf: Path
    cluster_name: str
    partition: str
    node: str
    cpus: int
    gpus: int
    gpu_type: str
    ports: dict[str, int]
    pids: dict[str, int]

    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, sacct, submitit) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf), "PATH": SEARCH_PATH}

    def to_json(self) -> dict[str, object]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "ClusterInfo":
        data = dict(data)
        data["dir"] = Path(str(data["dir"]))
        data["slurm_conf"] = Path(str(data["slurm_conf"]))
        return cls(**data)  # type: ignore[arg-type]


# ---------------------------------------------------------------- prerequisites


def _which(binary: str) -> str | None:
    return shutil.which(binary, path=SEARCH_PATH)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (None if it can): used by the tests to skip."""
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (slurmd runs jobs as the submitting user)"
    missing = missing_binaries()
    if missing:
        return f"SLURM test cluster binaries missing ({', '.join(missing)}): {INSTALL_HINT}"
    return None


def make_cluster_dir() -> Path:
    """A fresh 0755 dir under /tmp: munged insists every ancestor of its socket is world-x,
    which pytest's 0700 tmp_path is not."""
    path = Path(tempfile.mkdtemp(prefix="kdexp-slurm-", dir="/tmp"))
    path.chmod(0o755)
    return path


def _check_dir(path: Path) -> None:
    if not path.exists():  # never chmod a dir we did not create (think --dir /tmp)
        path.mkdir(parents=True)
        path.chmod(0o755)
    for parent in [path, *path.parents]:
        if not parent.stat().st_mode & 0o001:
            raise ClusterError(f"{parent} is not world-executable; munged refuses a socket below "
                               "it. Use a dir under /tmp (e.g. make_cluster_dir()).")
    if len(str(path)) > 80:  # unix socket paths (dir + /munge/munge.socket.2) max 107 bytes
        raise ClusterError(f"cluster dir path too long for unix sockets: {path}")


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is chosen so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- configuration


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return max(1024, kb // 1024 - 1024)


def _slurm_conf(d: Path, node: str, cpus: int, ports: dict[str, int]) -> str:
    sock = d / "munge/munge.socket.2"
    return f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={d}/state/ctld
SlurmdSpoolDir={d}/state/slurmd
SlurmctldPidFile={d}/state/slurmctld.pid
SlurmdPidFile={d}/state/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# default batch_sched_delay=3 starts array tasks in slow waves
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
# lets the node advertise more CPUs than the machine has, so more tiny jobs run at once
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports["slurmdbd"]}
# slurmctld ignores AuthInfo towards slurmdbd; without this it dies with "no TRES"
AccountingStoragePass={sock}
AccountingStorageTRES=gres/gpu,gres/shard
GresTypes=gpu,shard
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_mem_mb()} Gres=gpu:{GPU_TYPE}:{GPUS},shard:{GPUS * SHARDS_PER_GPU} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _slurmdbd_conf(d: Path, ports: dict[str, int]) -> str:
    return f"""\
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket.2
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports["slurmdbd"]}
SlurmUser=root
PidFile={d}/state/slurmdbd.pid
LogFile={d}/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["mariadbd"]}
StorageUser=root
StorageLoc=slurm_acct_db
"""


def _write_files(d: Path, node: str, cpus: int, ports: dict[str, int]) -> Path:
    for sub in ("munge", "etc", "dev", "db", "state/ctld", "state/slurmd", "log", "pids"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "munge-key").mkdir(mode=0o700)
    key = d / "munge-key/munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    # Fake GPUs: a gres count without device files drains the node, regular files are refused.
    for i in range(GPUS):
        (d / f"dev/gpu{i}").symlink_to("/dev/null")
    (d / "etc/gres.conf").write_text(
        f"NodeName={node} Name=gpu Type={GPU_TYPE} File={d}/dev/gpu[0-{GPUS - 1}]\n"
        f"NodeName={node} Name=shard Count={GPUS * SHARDS_PER_GPU} File={d}/dev/gpu[0-{GPUS - 1}]\n")
    conf = d / "etc/slurm.conf"
    conf.write_text(_slurm_conf(d, node, cpus, ports))
    dbd = d / "etc/slurmdbd.conf"
    dbd.write_text(_slurmdbd_conf(d, ports))
    dbd.chmod(0o600)  # slurmdbd refuses a conf others can read (it may hold the DB password)
    return conf


# ---------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of pid, or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # comm may contain spaces: split after it
    return fields[0], int(fields[19])


def _alive(pid: int, start_ticks: int) -> bool:
    """True if pid is still our (non-zombie) process. Stopped daemons linger as zombies here
    until PID 1 reaps them, and kill -0 succeeds on zombies, so look at /proc instead."""
    _reap(pid)
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == start_ticks and stat[0] not in "ZX"


def _reap(pid: int) -> None:
    # When start() ran in this process the daemons are our children: reap them ourselves.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _spawn(d: Path, name: str, argv: Sequence[str], env: dict[str, str]) -> int:
    if _which(argv[0]) is None:
        raise ClusterError(f"{argv[0]} not found: {INSTALL_HINT}")
    out = open(d / f"log/{name}.out", "ab")
    # Own session: the daemon survives the CLI process and ignores the terminal's Ctrl-C.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            env=env, cwd=d, start_new_session=True)
    out.close()
    stat = _proc_stat(proc.pid)
    start_ticks = stat[1] if stat else 0
    (d / f"pids/{name}.pid").write_text(f"{proc.pid} {start_ticks}\n")
    return proc.pid


def _recorded(d: Path) -> dict[str, tuple[int, int]]:
    """name -> (pid, start ticks) from the pid files written by _spawn."""
    result = {}
    for name in DAEMONS:
        path = d / f"pids/{name}.pid"
        if path.exists():
            pid, ticks = path.read_text().split()
            result[name] = (int(pid), int(ticks))
    return result


def _log_tail(d: Path, name: str, lines: int = 20) -> str:
    # Daemons in the foreground log to both files; munged only to stderr (.out).
    for path in (d / f"log/{name}.log", d / f"log/{name}.out"):
        if path.exists() and path.stat().st_size:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            return f"--- last lines of {path}:\n" + "\n".join(tail)
    return f"(no log output from {name})"


def _wait(d: Path, name: str, ready: Callable[[], bool], timeout: float = 300.0) -> None:
    pid, ticks = _recorded(d)[name]
    deadline = time.monotonic() + timeout
    while not ready():
        if not _alive(pid, ticks):
            raise ClusterError(f"{name} exited during start-up\n{_log_tail(d, name)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{name} not ready after {timeout:.0f} s\n{_log_tail(d, name)}")
        time.sleep(0.1)


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _ok(argv: Sequence[str], env: dict[str, str]) -> str | None:
    """stdout of a quick client command, or None if it failed."""
    try:
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return None
    return res.stdout if res.returncode == 0 else None


# ---------------------------------------------------------------- daemons


def _start_munged(d: Path, env: dict[str, str]) -> None:
    sock = d / "munge/munge.socket.2"
    _spawn(d, "munged", ["munged", "--foreground", f"--socket={sock}",
                         f"--key-file={d}/munge-key/munge.key", f"--pid-file={d}/munge/munged.pid",
                         f"--seed-file={d}/munge/munged.seed"], env)  # logs to stderr: munged.out
    _wait(d, "munged", lambda: _ok(["munge", "-n", f"--socket={sock}"], env) is not None)


# A throw-away database: durability only costs time. Passed to install-db too, so the
# bootstrap writes an 8 MB redo log instead of 96 MB and the server need not resize it.
_INNODB = ("--innodb-log-file-size=8M", "--innodb-flush-log-at-trx-commit=0",
           "--innodb-doublewrite=0", "--innodb-buffer-pool-size=32M",
           "--innodb-lock-wait-timeout=900")  # slurmdbd warns below 900


def _start_mariadbd(d: Path, env: dict[str, str], port: int) -> None:
    datadir = d / "db/data"
    # --no-defaults: never read /etc/mysql, whose settings point at the system instance.
    init = subprocess.run(
        ["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
         "--auth-root-authentication-method=normal", "--skip-test-db", *_INNODB],
        env=env, capture_output=True, text=True)
    if init.returncode != 0:
        raise ClusterError(f"mariadb-install-db failed:\n{init.stdout}\n{init.stderr}")
    _spawn(d, "mariadbd", ["mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root",
                           "--bind-address=127.0.0.1", f"--port={port}",
                           f"--socket={d}/db/mariadbd.sock", f"--pid-file={d}/db/mariadbd.pid",
                           f"--log-error={d}/log/mariadbd.log", "--skip-log-bin", *_INNODB], env)
    _wait(d, "mariadbd", lambda: _tcp_open(port))


def _start_slurmdbd(d: Path, env: dict[str, str], port: int) -> None:
    # slurmdbd has no -f: it reads slurmdbd.conf next to $SLURM_CONF.
    _spawn(d, "slurmdbd", ["slurmdbd", "-D"], env)
    _wait(d, "slurmdbd", lambda: _tcp_open(port))


def _start_slurmctld(d: Path, env: dict[str, str], port: int) -> None:
    # -i: ignore (absent) saved state; the state dir is fresh anyway.
    _spawn(d, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(d / "etc/slurm.conf")], env)
    _wait(d, "slurmctld", lambda: _tcp_open(port))


def _start_slurmd(d: Path, env: dict[str, str], node: str) -> None:
    _spawn(d, "slurmd", ["slurmd", "-D", "-N", node, "-f", str(d / "etc/slurm.conf")], env)
    sinfo = ["sinfo", "-h", "-N", "-n", node, "-o", "%T"]
    _wait(d, "slurmd", lambda: (_ok(sinfo, env) or "").strip() == "idle")


def _wait_registered(d: Path, env: dict[str, str]) -> None:
    """slurmctld registers the cluster in slurmdbd asynchronously; sacct needs it done."""
    cmd = ["sacctmgr", "-n", "-P", "show", "cluster", CLUSTER_NAME, "format=cluster,controlport"]
    _wait(d, "slurmctld", lambda: (_ok(cmd, env) or "").strip().endswith(
        f"|{_ports(d)['slurmctld']}"))


def _ports(d: Path) -> dict[str, int]:
    return ClusterInfo.from_json(json.loads((d / STATE_FILE).read_text())).ports


# ---------------------------------------------------------------- public API


def start(dir: Path | str, cpus: int = 8) -> ClusterInfo:
    """Start a fresh cluster with all state in ``dir`` and return how to reach it.

    Raises ClusterError if binaries are missing, a cluster from ``dir`` still runs, or a daemon
    fails to come up (then everything started so far is stopped again)."""
    d = Path(dir).resolve()
    reason = unavailable_reason()
    if reason:
        raise ClusterError(reason)
    _check_dir(d)
    running = [n for n, (pid, ticks) in _recorded(d).items() if _alive(pid, ticks)]
    if running:
        raise ClusterError(f"a cluster in {d} is still running ({', '.join(running)}); stop it first")
    _wipe(d)  # leftovers of a crashed run: stale job ids and DB rows confuse sacct
    node = socket.gethostname().split(".")[0]
    ports = dict(zip(("mariadbd", "slurmdbd", "slurmctld", "slurmd"), _free_ports(4)))
    conf = _write_files(d, node, cpus, ports)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SEARCH_PATH}
    info = ClusterInfo(d, conf, CLUSTER_NAME, PARTITION, node, cpus, GPUS, GPU_TYPE, ports, {})
    (d / STATE_FILE).write_text(json.dumps(info.to_json(), indent=1))
    try:
        _start_munged(d, env)
        _start_mariadbd(d, env, ports["mariadbd"])
        _start_slurmdbd(d, env, ports["slurmdbd"])
        _start_slurmctld(d, env, ports["slurmctld"])
        _start_slurmd(d, env, node)
        _wait_registered(d, env)
    except BaseException:
        _kill_all(d)  # keep the logs for the error message the caller is about to see
        raise
    info = dataclasses.replace(info, pids={n: p for n, (p, _) in _recorded(d).items()})
    (d / STATE_FILE).write_text(json.dumps(info.to_json(), indent=1))
    return info


def load(dir: Path | str) -> ClusterInfo:
    """The ClusterInfo of a cluster started in ``dir``."""
    path = Path(dir).resolve() / STATE_FILE
    if not path.exists():
        raise ClusterError(f"no cluster state in {path.parent}")
    return ClusterInfo.from_json(json.loads(path.read_text()))


def status(dir: Path | str) -> dict[str, bool]:
    """daemon name -> alive, for the daemons recorded in ``dir``."""
    return {n: _alive(pid, ticks) for n, (pid, ticks) in _recorded(Path(dir).resolve()).items()}


def cancel_all_jobs(info: ClusterInfo, timeout: float = 120.0) -> None:
    """scancel every job in the cluster and wait until the queue is empty."""
    env = info.env()
    ids = (_ok(["squeue", "-h", "-o", "%A"], env) or "").split()
    if not ids:
        return
    subprocess.run(["scancel", *sorted(set(ids))], env=env, capture_output=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # COMPLETING jobs still have processes (KillWait=5 s); wait until they are gone too.
        if not (_ok(["squeue", "-h", "-o", "%A"], env) or "").split():
            return
        time.sleep(0.2)


def stop(dir: Path | str, wipe: bool = True) -> None:
    """Cancel remaining jobs, kill exactly the daemons recorded in ``dir``, and wipe its state
    (controller state and database together: keeping one makes job ids clash in sacct)."""
    d = Path(dir).resolve()
    recorded = _recorded(d)
    if (d / STATE_FILE).exists() and all(status(d).get(n) for n in ("munged", "slurmctld")):
        cancel_all_jobs(load(d))  # otherwise job processes outlive slurmd
    _kill_all(d)
    if wipe:
        _wipe(d)
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    leftover = [n for n, (pid, ticks) in recorded.items() if _alive(pid, ticks)]
    if leftover:
        raise ClusterError(f"daemons still alive after stop: {', '.join(leftover)}")


def _kill_all(d: Path, timeout: float = 15.0) -> None:
    # Reverse start order, so no daemon spends the shutdown retrying a dead dependency.
    for name, (pid, ticks) in reversed(list(_recorded(d).items())):
        _kill(pid, ticks, timeout)


def _kill(pid: int, ticks: int, timeout: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _alive(pid, ticks):
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(pid, ticks) and time.monotonic() < deadline:
            time.sleep(0.05)


def _wipe(d: Path) -> None:
    for name in OWNED:
        path = d / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/cluster/testcluster.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", required=True, type=Path,
                        help="state dir (under /tmp: munged needs world-x ancestors)")
    parser.add_argument("--cpus", type=int, default=8, help="CPUs the node advertises")
    parser.add_argument("--keep", action="store_true", help="stop: keep logs and state")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            t0 = time.monotonic()
            info = start(args.dir, cpus=args.cpus)
            print(f"started in {time.monotonic() - t0:.1f} s; pids {info.pids}", file=sys.stderr)
            print(f"export SLURM_CONF={info.slurm_conf}")
            print(f"export KDEXP_SITE_DIR={SITE_DIR}")
        elif args.command == "stop":
            stop(args.dir, wipe=not args.keep)
        else:
            alive = status(args.dir)
            if not alive:
                print(f"no cluster recorded in {args.dir}")
            for name, ok in alive.items():
                print(f"{name}: {'running' if ok else 'dead'}")
            return 0 if alive and all(alive.values()) else 1
    except ClusterError as exc:
        print(f"testcluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
