"""GPUs for the jobs of one machine: each running job that asks for k GPUs gets k of its own.

`snakemake --resources gpu=N` bounds how many GPUs the running jobs ask for together, not which
ones: every job sees every device and starts on GPU 0. The train rule runs its command through
`python -m snaketune.gpus K -- COMMAND`, which picks K devices that no other running job holds
(one exclusive flock per device, taken without waiting; the lock belongs to COMMAND's process,
which it execs, so it is released when that exits, even when killed), sets CUDA_VISIBLE_DEVICES
to them, and execs COMMAND. K = 0 leaves the environment as it is; inside a SLURM job, SLURM
has already given the job its GPUs.

The machine's devices: config `local_gpus` (the workflow hands it to its jobs as
SNAKETUNE_LOCAL_GPUS), else the CUDA_VISIBLE_DEVICES snakemake was started with, else the
GPUs `nvidia-smi -L` lists.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEVICES_VARIABLE = "SNAKETUNE_LOCAL_GPUS"
"""The machine's GPU ids, comma-separated, as config local_gpus lists them."""


def machine_devices() -> list[str]:
    for variable in (DEVICES_VARIABLE, "CUDA_VISIBLE_DEVICES"):
        listed = os.environ.get(variable, "").strip()
        if listed:
            return [d.strip() for d in listed.split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    found = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return [str(i) for i, line in enumerate(found.stdout.splitlines()) if line.startswith("GPU")]


def gpu_numbers(field: str) -> list[float]:
    """One number per GPU of this machine, as `nvidia-smi --query-gpu=FIELD` gives it (no CUDA
    initialised); empty without nvidia-smi or where it cannot tell."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"]
    found = subprocess.run(query, capture_output=True, text=True, check=False).stdout.split()
    return [float(m) for m in found if m.replace(".", "", 1).isdigit()]


def smallest_gpu_memory() -> float | None:
    """Bytes of memory of this machine's smallest GPU, or None without one."""
    sizes = gpu_numbers("memory.total")
    return min(sizes) * 2**20 if sizes else None


BF16_COMPUTE_CAPABILITY = 8.0
"""bf16 arithmetic came with Ampere (compute capability 8.0)."""


def gpus_without_bf16(devices: list[str]) -> list[float]:
    """The compute capabilities, below bf16's, of the GPUs among `devices` (machine_devices:
    the ones the jobs may use; ids that are not nvidia-smi indices count every GPU)."""
    capabilities = dict(enumerate(gpu_numbers("compute_cap")))
    if devices and all(d.isdigit() for d in devices):
        capabilities = {i: c for i, c in capabilities.items() if str(i) in devices}
    return [c for c in capabilities.values() if c < BF16_COMPUTE_CAPABILITY]


def lock_folder() -> Path:
    """Machine-wide (GPUs are): every snaketune workflow of this user on this machine."""
    folder = Path(tempfile.gettempdir()) / f"snaketune-gpus-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def acquire(count: int, devices: list[str], folder: Path) -> list[str]:
    """`count` devices no one holds, locked by open descriptors that survive an exec."""
    held: list[tuple[str, int]] = []
    for device in devices:
        if len(held) == count:
            break
        fd = os.open(folder / f"gpu-{device}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.set_inheritable(fd, True)
        held.append((device, fd))
    if len(held) < count:
        for _, fd in held:
            os.close(fd)
        raise SystemExit(
            f"snaketune gpus: the job needs {count} GPU(s), but only {len(held)} of this "
            f"machine's devices {devices} are free (the others are held by running jobs). Give "
            f"snakemake --resources gpu=<at most {len(devices)}>, or list the machine's devices "
            "in config local_gpus."
        )
    return [device for device, _ in held]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        raise SystemExit("usage: python -m snaketune.gpus K -- COMMAND [ARG...]")
    count, command = int(args[0]), args[2:]
    if count > 0 and "SLURM_JOB_ID" not in os.environ:
        devices = acquire(count, machine_devices(), lock_folder())
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        print(f"snaketune gpus: CUDA_VISIBLE_DEVICES={','.join(devices)}", file=sys.stderr)
        sys.stderr.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
