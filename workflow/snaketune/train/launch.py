"""Training on several nodes (train.nodes > 1): one torchrun agent per node, joined by torchrun's
c10d rendezvous, each starting train.processes training processes; the training code is the
one-node code (process 0 alone writes outputs).

    python -m snaketune.train.launch NODES PROCESSES train <the train CLI's arguments>

Inside a SLURM job of NODES tasks (one per node: sbatch --nodes=NODES --ntasks-per-node=1,
which the train rule asks the SLURM profile for) srun starts the agents, one per task, and the
rendezvous is on the allocation's first node (its NodeAddr, from `scontrol show job` and
`scontrol show hostnames`), port RENDEZVOUS_PORT, id the job id; every agent reaches it
there. Elsewhere the NODES agents run on this machine over
127.0.0.1 (a free port): the same rendezvous, for a workstation and the tests. A SIGTERM (a
requeue) reaches every agent, which passes it to its processes; the exit status is the worst
agent's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

RENDEZVOUS_PORT = 29400
"""torchrun's default c10d port, on the first node of a SLURM allocation."""


def agent_command(nodes: int, processes: int, endpoint: str, run_id: str, args: list[str]):
    # torchrun of this interpreter, which has snaketune (PATH may lack its environment).
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc_per_node={processes}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={run_id}",
        "-m",
        "snaketune.cli",
        *args,
    ]


def scontrol_record(*args: str, check: bool = True) -> dict[str, str]:
    """`scontrol --oneliner ARGS` (a `show` of one record) as {field: value}; unchecked, a
    failed command gives {}."""
    command = ["scontrol", "--oneliner", *args]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=60, check=check)
    return dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)


def slurm_job(job_id: str) -> dict[str, str]:
    """SLURM's record of the job: its task count and node list, which a job step's environment
    may lack (the SLURM executor plugin's job step keeps only SLURM_JOB_ID of the SLURM_*
    variables)."""
    return scontrol_record("show", "job", job_id)


def check_tasks(nodes: int, job_id: str, tasks: int) -> None:
    """A SLURM job with fewer tasks than nodes would run all its agents on one node."""
    if tasks < nodes:
        raise SystemExit(
            f"snaketune.train.launch: train.nodes is {nodes}, but SLURM job {job_id} has {tasks} "
            f"task(s): submit it with --nodes={nodes} --ntasks-per-node=1 (the profile asks for "
            f"that itself, unless --set-resources gave train_model fewer tasks)"
        )


def first_node(node_list: str) -> str:
    """The address of the allocation's first node, as SLURM reaches it (its NodeAddr; the
    name where none is set)."""
    shown = subprocess.run(
        ["scontrol", "show", "hostnames", node_list], capture_output=True, text=True, check=True
    )
    name = shown.stdout.split()[0]
    return scontrol_record("show", "node", name, check=False).get("NodeAddr") or name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_here(nodes: int, processes: int, args: list[str]) -> int:
    """The agents as children of this process, on 127.0.0.1."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex
    # The job's threads per process (OMP_NUM_THREADS, set by the train rule for one node's
    # processes) shared by the agents, which all run here.
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")) // nodes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    agents = [
        subprocess.Popen(agent_command(nodes, processes, endpoint, run_id, args), env=env)
        for _ in range(nodes)
    ]

    def forward(signum, _frame):
        for agent in agents:
            if agent.poll() is None:
                agent.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [agent.wait() for agent in agents]
    failed = [code for code in codes if code != 0]
    if not failed:
        return 0
    return failed[0] if failed[0] > 0 else 128 - failed[0]  # killed by signal N: 128 + N


USAGE = "usage: python -m snaketune.train.launch NODES PROCESSES train <the train CLI's arguments>"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or not (argv[0].isdigit() and argv[1].isdigit()) or int(argv[0]) < 1:
        print(f"{USAGE}\n(the train rule runs it for train.nodes > 1)", file=sys.stderr)
        return 2
    nodes, processes, args = int(argv[0]), int(argv[1]), argv[2:]
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return run_here(nodes, processes, args)
    job = slurm_job(job_id)
    check_tasks(nodes, job_id, int(job["NumTasks"]))
    command = slurm_command(nodes, processes, args, first_node(job["NodeList"]), job_id)
    os.execvp(command[0], command)


def slurm_command(nodes: int, processes: int, args: list[str], head: str, job_id: str) -> list[str]:
    """srun starting one agent per task, the rendezvous on the allocation's first node."""
    endpoint = f"{head}:{RENDEZVOUS_PORT}"
    agent = agent_command(nodes, processes, endpoint, job_id, args)
    # One agent per task; which node each task is on is the allocation's (sbatch --nodes=N
    # --ntasks-per-node=1 puts one on each node).
    return ["srun", f"--ntasks={nodes}", "--kill-on-bad-exit=1", *agent]


if __name__ == "__main__":
    sys.exit(main())
