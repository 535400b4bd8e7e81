"""A real single-node Slurm cluster for the tests: munged, slurmctld and slurmd started by hand in a
temporary folder (no systemd), on free ports, stopped afterwards.

Needs Debian's slurmctld, slurmd, slurm-client and munge (`.ci/run` installs them) and root, as slurmd
runs jobs as their user. `start()` returns None with the reason when the daemons cannot run here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


@dataclass
class SlurmCluster:
    folder: Path
    conf: Path
    processes: list[subprocess.Popen]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a daemon stuck on its peers must not outlive the tests
                process.kill()
                process.wait()


def _munge_works() -> bool:
    try:
        return subprocess.run(["munge", "-n"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def why_not() -> str | None:
    missing = [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if missing:
        install = "apt-get install slurmctld slurmd slurm-client munge"
        return f"Slurm is not installed ({', '.join(missing)} missing): {install}"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def start(folder: Path) -> tuple[SlurmCluster | None, str | None]:
    reason = why_not()
    if reason:
        return None, reason
    folder.mkdir(parents=True, exist_ok=True)
    processes = []
    if not _munge_works():  # not running, or a socket left behind by a munged that is gone (a restored machine)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        command = ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"]
        subprocess.run(command, check=False, capture_output=True)
        for _ in range(50):
            if _munge_works():
                break
            time.sleep(0.1)
        else:
            return None, "munged did not start (munge -n fails)"
    node = subprocess.run(["/usr/sbin/slurmd", "-C"], capture_output=True, text=True).stdout.splitlines()[0]
    facts = dict(item.split("=", 1) for item in node.split()[1:])
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(
        f"""ClusterName=specialist-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
SchedulerParameters=requeue_setup_env_fail
NodeName=localhost NodeAddr=127.0.0.1 CPUs={facts["CPUs"]} RealMemory={int(facts["RealMemory"]) - 512} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(folder, conf, processes)
    for command in (["/usr/sbin/slurmctld", "-D", "-i"], ["/usr/sbin/slurmd", "-D", "-N", "localhost"]):
        log = (folder / f"{Path(command[0]).name}.stdout").open("w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
    deadline = time.time() + 30
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
        if out in ("idle", "mixed", "allocated"):
            return cluster, None
        time.sleep(0.3)
    cluster.stop()
    log_tail = (folder / "slurmctld.log").read_text()[-500:] if (folder / "slurmctld.log").exists() else ""
    return None, f"the Slurm node did not become idle within 30 s (sinfo: {out!r}); {log_tail}"
