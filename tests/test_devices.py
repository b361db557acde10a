"""Device choice and the per-GPU slot claim of jobs that share a multi-GPU machine."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from safemeta import devices

# A process that claims one of 2 GPU slots, prints the index it got, and holds it until stdin closes.
CLAIM = ("import os, sys; from safemeta.devices import claim_gpu; "
         "i = claim_gpu(n_gpus=2, lock_dir=sys.argv[1], poll_s=0.05); "
         "print(i, os.environ['CUDA_VISIBLE_DEVICES'], flush=True); sys.stdin.read()")


def claimer(lock_dir) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.Popen([sys.executable, "-c", CLAIM, str(lock_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def test_concurrent_jobs_claim_distinct_gpus_and_a_third_waits(tmp_path):
    first, second = claimer(tmp_path), claimer(tmp_path)
    got = {first.stdout.readline().split()[0], second.stdout.readline().split()[0]}
    assert got == {"0", "1"}
    third = claimer(tmp_path)
    time.sleep(1.0)
    assert third.poll() is None
    first.stdin.close()   # the first job ends: its slot frees
    first.wait()
    index, visible = third.stdout.readline().split()
    assert index == visible and index in got
    for proc in (second, third):
        proc.stdin.close()
        proc.wait()


def test_no_claim_when_visible_devices_are_set_or_one_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "_held", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # as SLURM sets it
    assert devices.claim_gpu(n_gpus=4, lock_dir=tmp_path) is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and not list(tmp_path.iterdir())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert devices.claim_gpu(n_gpus=1, lock_dir=tmp_path) is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_resolve_device(monkeypatch):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        devices.resolve_device("gpu")
    monkeypatch.setattr(devices, "claim_gpu", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        devices.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cuda")
