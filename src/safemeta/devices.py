"""Torch device of a job, and one GPU per job when several jobs share a multi-GPU machine.

Snakemake counts GPU jobs (`resources: gpu=1` with `--resources gpu=N`) but never says which GPU
a job should use, so without help every job lands on GPU 0. `claim_gpu` takes a free slot: one
lock file per GPU, locked with `flock` for the life of the process, and pins the job to that
GPU through `CUDA_VISIBLE_DEVICES`. It must run before torch initialises CUDA, and it does
nothing where `CUDA_VISIBLE_DEVICES` is already set (SLURM sets it for the GPUs it allocates).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LOCK_DIR_ENV = "SAFEMETA_GPU_LOCK_DIR"
DEFAULT_LOCK_DIR = Path("/tmp/safemeta-gpu-locks")
SETTINGS = ("auto", "cpu", "cuda")

_held: IO[str] | None = None  # the slot lock of this process, released when it exits


def visible_gpu_count() -> int:
    """GPUs the NVIDIA driver lists (`nvidia-smi -L`), without initialising CUDA; 0 if none."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def claim_gpu(n_gpus: int | None = None, lock_dir: str | Path | None = None, poll_s: float = 2.0) -> int | None:
    """Pin this process to a free GPU when several are visible; return its index (None: no claim).

    Waits (polling every `poll_s` seconds) while every slot is taken. No claim is made when
    `CUDA_VISIBLE_DEVICES` is set, when fewer than two GPUs are visible, or when this process
    already holds a slot.
    """
    global _held
    if "CUDA_VISIBLE_DEVICES" in os.environ or _held is not None:
        return None
    n = visible_gpu_count() if n_gpus is None else n_gpus
    if n < 2:
        return None
    directory = Path(lock_dir or os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(n):
            handle = open(directory / f"gpu{index}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _held = handle
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
            return index
        if not waited:
            print(f"all {n} GPU slots in {directory} are taken; waiting for one", file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll_s)


def resolve_device(setting: str) -> "torch.device":
    """The torch device for a config `device` value: auto (cuda when available, else cpu), cpu, cuda.

    For auto and cuda the GPU slot is claimed first (`claim_gpu`), before CUDA initialises.
    """
    import torch

    if setting not in SETTINGS:
        raise ValueError(f"device must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    claim_gpu()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if setting == "cuda":
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    return torch.device("cpu")
