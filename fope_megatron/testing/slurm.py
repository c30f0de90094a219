"""A real, throwaway Slurm cluster on localhost for tests: munged, slurmctld and two slurmd.

``LocalSlurmCluster.start(root)`` writes everything under ``root`` (munge key and socket,
``slurm.conf``, state, spool, logs) and touches nothing in ``/etc``: the daemons get the config
path on their command line and clients get it through ``SLURM_CONF`` in ``cluster.env``. The two
nodes ``node1`` and ``node2`` are two slurmd processes on this machine, both ``NodeAddr=127.0.0.1``
with their own ``Port=`` and spool directory; every port is picked free at start.

Written for Debian 12's slurm-wlm 22.05 (``.ci/install_system_deps.sh`` installs it) and run as
root: ``SlurmUser=root``, no cgroups (``proctrack/linuxproc``, ``task/none``).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REQUIRE_ENV = "FOPE_REQUIRE_SLURM"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# Inherited from an enclosing allocation these would make sbatch/srun talk about the wrong job.
_FOREIGN_ENV = re.compile(r"^(SLURM_|SBATCH_|SRUN_|SALLOC_|SQUEUE_|SINFO_)")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def missing_reason() -> str | None:
    """Why a local cluster cannot start here (missing binaries, not root), or None if it can."""
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if missing:
        return (
            f"Slurm/munge binaries not found: {', '.join(missing)} "
            "(install with .ci/install_system_deps.sh: apt-get install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        return "the local Slurm cluster runs slurmd as root (SlurmUser=root); run the tests as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # hold all of them open so the n ports differ
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalSlurmCluster:
    """Handle on a running local cluster; clients must run with ``env`` (``SLURM_CONF``)."""

    root: Path
    nodes: tuple[str, ...]
    partition: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(
        cls,
        root: Path,
        nodes: Sequence[str] = ("node1", "node2"),
        partition: str = "debug",
        timeout: float = 60.0,
    ) -> LocalSlurmCluster:
        """Write the config under ``root``, start the daemons and wait until all nodes are idle."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        # munged refuses key/socket directories that others may write; slurmstepd wants to traverse.
        root.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
        env["SLURM_CONF"] = str(root / "slurm.conf")
        cluster = cls(root=root, nodes=tuple(nodes), partition=partition, env=env)
        try:
            cluster._start_munged()
            ports = _free_ports(1 + len(nodes))
            cluster._write_conf(ctld_port=ports[0], node_ports=ports[1:])
            cluster._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", env["SLURM_CONF"]])
            for node in nodes:
                (root / "spool" / node).mkdir(parents=True, exist_ok=True)
                cluster._spawn(
                    f"slurmd-{node}",
                    [_which("slurmd"), "-D", "-N", node, "-f", env["SLURM_CONF"]],
                )
            cluster.wait_idle(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, name: str, argv: list) -> None:
        log = open(self.root / f"{name}.out", "ab")
        # Own session: a Ctrl-C aimed at pytest must not kill the daemons before teardown runs.
        self.procs[name] = subprocess.Popen(
            [str(a) for a in argv],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def _start_munged(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o755, exist_ok=True)
        key = mdir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # munged requires 0600
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",  # allow running as root, and a socket path outside /run/munge
                f"--key-file={key}",
                f"--socket={mdir / 'munge.socket'}",
                f"--pid-file={mdir / 'munged.pid'}",
                f"--log-file={mdir / 'munged.log'}",
                f"--seed-file={mdir / 'munged.seed'}",
            ],
        )
        self.poll(lambda: (mdir / "munge.socket").exists(), 20, "munged to create its socket")

    def _write_conf(self, ctld_port: int, node_ports: Sequence[int]) -> None:
        r = self.root
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports, strict=True)
        )
        # Job scripts derive ports from the job id; a random first id keeps two test clusters on
        # one machine (parallel CI runs) from deriving the same ones.
        first_job_id = random.randrange(1000, 14000)
        conf = f"""\
# Generated by fope_megatron.testing.slurm for a throwaway local test cluster.
ClusterName=fopetest
FirstJobId={first_job_id}
# slurmctld only runs where SlurmctldHost names this machine's short hostname.
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
ReturnToService=2
# Both slurmd see every CPU of this machine; do not drain a node over the count.
SlurmdParameters=config_overrides
PropagateResourceLimits=NONE
SchedulerType=sched/backfill
# Requeued jobs wait for the periodic scheduler pass: run it every second, not every minute.
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=5
InactiveLimit=0
# sbatch --wait polls every 2 s only while that is under MinJobAge/2, else backs off to 32 s.
# Finished jobs stay visible for at least this long (slurmctld purges them once a minute).
MinJobAge=4
MailProg=/bin/true
{node_lines}
PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        (r / "state").mkdir(exist_ok=True)
        (r / "slurm.conf").write_text(conf)

    def stop(self) -> None:
        """Cancel every job, stop the daemons (TERM, then KILL), and leave ``root`` in place."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--partition", self.partition, check=False, timeout=15)
            self.poll(lambda: not self.jobs(), 30, "jobs to end", fail=False)
        self._kill_stepds()
        for name in reversed(list(self.procs)):  # slurmd first, munged last
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def _kill_stepds(self) -> None:
        """Kill any slurmstepd left by this cluster: it holds our SlurmdLogFile open."""
        for pid in _slurmstepd_pids_under(self.root):
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # ------------------------------------------------------------------ clients
    def run(
        self, *argv: str, check: bool = True, timeout: float = 30, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; raise with daemon logs on failure."""
        proc = subprocess.run(
            [str(a) for a in argv],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, argv))} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}\n{self.diagnostics()}"
            )
        return proc

    def sbatch(self, *argv: str, env: dict | None = None, timeout: float = 30) -> int:
        """Submit with ``sbatch --parsable ARGV``; return the job id."""
        out = self.run("sbatch", "--parsable", *argv, env=env, timeout=timeout).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} if unknown.

        Finished jobs are forgotten 4 to 64 s after they end (``MinJobAge=4``): read their final
        state with ``wait_job`` or right after ``sbatch --wait`` returns.
        """
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def jobs(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i %T", check=False).stdout
        return [line for line in out.splitlines() if line.strip()]

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until the job has ended (COMPLETED, FAILED, ...); return its record."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        info: dict[str, str] = {}

        def done() -> bool:
            nonlocal info
            info = self.job(job_id)
            return info.get("JobState") in final

        self.poll(done, timeout, f"job {job_id} to end")
        return info

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout: float = 60) -> None:
        def idle() -> bool:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}\n{self.diagnostics()}")
            states = self.node_states()
            return all(states.get(n) == "idle" for n in self.nodes)

        self.poll(idle, timeout, f"nodes {self.nodes} to be idle")

    # ------------------------------------------------------------------ helpers
    def diagnostics(self, chars: int = 3000) -> str:
        """Tails of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            text = path.read_text(errors="replace")[-chars:]
            parts.append(f"----- {path.name} (tail) -----\n{text}")
        return "\n".join(parts)

    def poll(self, cond, timeout: float, what: str, fail: bool = True) -> bool:
        """Call ``cond()`` every 0.25 s until true; on timeout raise (with daemon logs) or return False."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.25)
        if fail:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what}\n{self.diagnostics()}"
            )
        return False


def _slurmstepd_pids_under(root: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "cmdline").read_bytes().startswith(b"slurmstepd"):
                continue
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        if any(f.startswith(str(root) + os.sep) for f in fds):
            pids.append(int(proc.name))
    return pids


def local_cluster(prefix: str = "fope-slurm-") -> Iterator[LocalSlurmCluster]:
    """Generator for a pytest fixture: skip (or fail under FOPE_REQUIRE_SLURM=1) without Slurm.

    A short ``/tmp`` path keeps the munge socket under the 108-byte Unix socket limit.
    """
    import pytest

    reason = missing_reason()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        cluster = LocalSlurmCluster.start(root)
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
