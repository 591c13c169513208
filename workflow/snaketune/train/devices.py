"""Where training and evaluation run, and in what precision: one decision for both.

`device: auto` is CUDA when a GPU is visible, else the CPU. `precision: auto` is bf16 autocast
on a GPU that has bf16, fp16 autocast with a gradient scaler on one that has not, and fp32 on
the CPU; `bf16` or `fp16` asked of a device that cannot run them is refused, never quietly
replaced. On CUDA, fp32 matrix products may use TF32 (`float32_matmul_precision("high")`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from snaketune.errors import TrainingError


@dataclass(frozen=True)
class Placement:
    device: torch.device
    autocast: torch.dtype | None
    """The autocast dtype (bf16 or fp16), or None for fp32."""

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def scaled(self) -> bool:
        """fp16 needs a gradient scaler: small gradients would flush to zero without one."""
        return self.autocast is torch.float16

    def autocasting(self) -> torch.autocast:
        """The autocast context of this placement (a no-op in fp32)."""
        dtype = self.autocast
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def describe(self) -> str:
        return (
            f"{self.device} with {str(self.autocast).removeprefix('torch.')} autocast"
            if (self.autocast)
            else f"{self.device} in fp32"
        )


def place(device: str, precision: str, local_rank: int = 0) -> Placement:
    """The device and autocast of a job (train.device and train.precision)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is visible")
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    where = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if precision in ("bf16", "fp16") and not use_cuda:
        raise TrainingError(
            f"train.precision is {precision!r} (autocast on CUDA) but this job runs on the CPU, "
            "in fp32: set train.precision: auto or fp32, or run the job where a GPU is visible"
        )
    if not use_cuda:
        return Placement(where, None)
    torch.set_float32_matmul_precision("high")
    has_bf16 = torch.cuda.is_bf16_supported()
    if precision == "bf16" and not has_bf16:
        raise TrainingError(
            f"train.precision is 'bf16' but {torch.cuda.get_device_name(where)} has no bf16: "
            "set train.precision: fp16 (or auto, which picks fp16 there)"
        )
    autocast = {
        "auto": torch.bfloat16 if has_bf16 else torch.float16,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp32": None,
    }[precision]
    return Placement(where, autocast)


def to_device(batch: dict[str, torch.Tensor], placement: Placement) -> dict[str, torch.Tensor]:
    """A batch on the job's device: from pinned host memory without waiting, on CUDA (a
    tensor there already, snaketune.train.prefetch's, as it is)."""
    if not placement.cuda:
        return batch
    return {
        k: v
        if v.device == placement.device
        else v.pin_memory().to(placement.device, non_blocking=True)
        for k, v in batch.items()
    }


def deterministic(setting: bool | str, placement: Placement) -> bool:
    """`auto` is exact on the CPU (resumes bit for bit) and fast on CUDA."""
    return (not placement.cuda) if setting == "auto" else bool(setting)


def set_deterministic(mode: bool, compiling: bool) -> None:
    """torch.use_deterministic_algorithms also sets torch.compile's flag, and imports the
    compiler to do so: 2.4 s of every training job's start on 2 cores. Without torch.compile
    only the kernels' switch, which is what that function sets besides, is set."""
    if mode:  # cuBLAS is deterministic only with a fixed workspace, read at its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if compiling:
        torch.use_deterministic_algorithms(mode, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=True)
