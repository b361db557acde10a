"""The pipeline on a real SLURM cluster, through profiles/slurm (tests/slurm/start-cluster.sh
starts a single-node one; without a working `sbatch` these tests skip, unless
SAFEMETA_REQUIRE_SLURM=1, as in CI, makes that an error).

One cluster run of the .test pipeline, with the meta-training of scenario `rand` lengthened so
that it can be cancelled midway: once its first checkpoint exists, `scancel` stops its SLURM job;
the profile's retry resubmits it and it resumes from the checkpoint. A local run of the same
config is the reference. The profile is profiles/slurm with its placeholders filled for the
local cluster and shorter status polling; every resource request is the real profile's.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import xarray as xr
import yaml

from safemeta.results import TIMING_VARS, read_dataset, without_timing
from test_workflow import REPO, TINY, make_workdir, smk

CANCELLED = ("rand", "safemeta", 0)  # the meta_train job that is cancelled midway
CONFIG = {**TINY, "scenarios": {**TINY["scenarios"],
                                "rand": {**TINY["scenarios"]["rand"], "metatrain": {"iterations": 100}}}}
GPU_RULES = {"meta_train", "meta_test", "single_task"}


def _sbatch_refusal() -> str | None:
    """Why `sbatch` cannot run this module's jobs here, or None."""
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        if ping.returncode != 0:  # answers at once, where sbatch retries for about 20 s
            return "no SLURM controller answers (scontrol ping); start one with tests/slurm/start-cluster.sh"
        res = subprocess.run(["sbatch", "--test-only", "--gpus=1", "--wrap", "true"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sbatch does not run ({exc}); start a cluster with tests/slurm/start-cluster.sh"
    if res.returncode != 0:
        return f"sbatch --test-only --gpus=1 fails ({res.stderr.strip()}); see tests/slurm/start-cluster.sh"
    return None


REFUSAL = _sbatch_refusal()
if REFUSAL and os.environ.get("SAFEMETA_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"SAFEMETA_REQUIRE_SLURM=1 but {REFUSAL}")
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(REFUSAL is not None, reason=REFUSAL or "")]


def local_profile(path: Path) -> Path:
    """profiles/slurm for the local cluster: account and partitions filled in, status polled often."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "profile.yaml").read_text())
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout
    partition = next(p for p in partition.split() if p.endswith("*")).rstrip("*")  # the default partition
    del profile["default-resources"]["slurm_account"]
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        if "slurm_partition" in resources:
            resources["slurm_partition"] = partition
    assert "<" not in yaml.safe_dump(profile), "a placeholder of profiles/slurm is left"
    profile.update({"slurm-no-account": True, "slurm-status-command": "squeue",
                    "slurm-init-seconds-before-status-checks": 2, "slurm-keep-successful-logs": True,
                    "latency-wait": 10})
    path.mkdir(parents=True)
    (path / "profile.yaml").write_text(yaml.safe_dump(profile))
    return path


def slurm_jobs(workdir: Path) -> list[dict[str, str]]:
    """Every job SLURM still knows (MinJobAge) that ran in `workdir`: id, rule, wildcards, state."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%k|%T|%Z"], capture_output=True, text=True,
                         check=True).stdout
    jobs = []
    for line in out.splitlines():
        job_id, comment, state, where = line.split("|")
        match = re.fullmatch(r"rule_(\w+?)_wildcards_(.*)", comment)
        if Path(where) == workdir and match:
            jobs.append({"id": job_id, "rule": match[1], "wildcards": match[2], "state": state})
    return jobs


def job_info(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout


def cancel_when_checkpointed(proc: subprocess.Popen, work: Path, timeout: float = 240) -> str:
    """scancel the SLURM job of CANCELLED's meta_train once its checkpoint exists; its job id."""
    scenario, method, seed = CANCELLED
    checkpoint = work / f"results/checkpoints/{scenario}/{method}/seed{seed}.pt"
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        assert proc.poll() is None, "snakemake ended before the meta_train job wrote a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.05)
    running = [j for j in slurm_jobs(work) if j["rule"] == "meta_train" and j["wildcards"] ==
               f"{scenario}_{method}_{seed}" and j["state"] == "RUNNING"]
    assert len(running) == 1, slurm_jobs(work)
    subprocess.run(["scancel", running[0]["id"]], check=True)
    return running[0]["id"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    work, local = make_workdir(root / "cluster", CONFIG), make_workdir(root / "local", CONFIG)
    profile = local_profile(root / "profile")
    start = time.monotonic()
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--profile", str(profile)]
    with open(root / "cluster.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        try:
            cancelled = cancel_when_checkpointed(proc, work)
            reference = smk(local, "--cores", "2")  # meanwhile, the same config locally
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = (root / "cluster.log").read_text()
    assert proc.returncode == 0, out
    print(f"cluster run: {time.monotonic() - start:.0f} s")
    return SimpleNamespace(work=work, local=local, out=out, jobs=slurm_jobs(work), cancelled=cancelled,
                           reference=reference)


def expected_jobs() -> set[tuple[str, str]]:
    """(rule, wildcards as SLURM comments spell them) of every job that is not a localrule."""
    jobs = set()
    for scenario in CONFIG["scenarios"]:
        for seed in CONFIG["seeds"]:
            jobs.add(("sample_tasks", f"{scenario}_{seed}"))
            for method in CONFIG["methods"]:
                jobs |= {("meta_train", f"{scenario}_{method}_{seed}"), ("meta_test", f"{scenario}_{method}_{seed}")}
    return jobs


def test_every_job_ran_as_a_slurm_job(runs):
    completed = {(j["rule"], j["wildcards"]) for j in runs.jobs if j["state"] == "COMPLETED"}
    assert completed == expected_jobs()
    assert [j["id"] for j in runs.jobs if j["state"] == "CANCELLED"] == [runs.cancelled]
    submitted = set(re.findall(r"submitted with SLURM jobid (\d+)", runs.out))
    assert submitted == {j["id"] for j in runs.jobs}  # what Snakemake submitted is what SLURM ran


def test_gpu_rules_ask_slurm_for_a_gpu_and_their_threads(runs):
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "profile.yaml").read_text())
    for job in runs.jobs:
        info = job_info(job["id"])
        gpus = re.search(r"TresPerJob=\S*gpu:(\d+)", info)
        cpus = int(re.search(r"NumCPUs=(\d+)", info)[1])
        if job["rule"] in GPU_RULES:
            assert gpus and gpus[1] == "1", info
            assert cpus == profile["set-threads"][job["rule"]], info
        else:
            assert gpus is None and cpus == 1, info
    # The job's command gets the threads as MuJoCo's simulation threads; Snakemake in the job caps
    # them at the cores it finds on the node (this machine's: the local node declares more).
    threads = min(profile["set-threads"]["meta_train"], len(os.sched_getaffinity(0)))
    train = [j for j in runs.jobs if j["rule"] == "meta_train" and j["state"] == "COMPLETED"][0]
    slurm_log = Path(re.search(r"StdOut=(\S+)", job_info(train["id"]))[1]).read_text()
    assert re.search(rf"Shell command: safemeta meta-train .* --threads {threads} ", slurm_log)


def test_cancelled_meta_train_resumed_from_its_checkpoint(runs):
    scenario, method, seed = CANCELLED
    log = (runs.work / f"logs/meta_train/{scenario}/{method}/seed{seed}.log").read_text()
    assert f"resuming from results/checkpoints/{scenario}/{method}/seed{seed}.pt" in log
    assert not (runs.work / "results/checkpoints").exists() or not any((runs.work / "results/checkpoints").rglob("*.pt"))


def _tasks(path: Path) -> str:
    """The task file as written, less its creation stamp."""
    text = path.read_text()
    stamp = json.loads(text)["provenance"]["created"]
    return text.replace(stamp, "")


def _policy(path: Path) -> dict:
    obj = torch.load(path, weights_only=False)
    obj["provenance"].pop("created")
    return obj


def assert_same(a, b, where) -> None:
    """Equal nested dicts, with tensors equal element for element (dtype and shape included)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_cluster_results_equal_the_local_run_bit_for_bit(runs):
    """Task files byte for byte, policies tensor for tensor, traces and summary.nc value for value
    (all less their creation stamps and wall times)."""
    files = sorted(p.relative_to(runs.local) for p in (runs.local / "results").rglob("*")
                   if p.is_file() and p.suffix in (".json", ".pt", ".nc") and "benchmarks" not in p.parts)
    assert {p.parts[1] for p in files} == {"tasks", "metatrain", "metatest", "summary.nc"}
    for rel in files:
        ours, ref = runs.work / rel, runs.local / rel
        if rel.suffix == ".json":
            assert _tasks(ours) == _tasks(ref), rel
        elif rel.suffix == ".pt":
            assert_same(_policy(ours), _policy(ref), str(rel))
        else:
            xr.testing.assert_identical(untimed(read_dataset(ours)), untimed(read_dataset(ref)))


def untimed(ds: xr.Dataset) -> xr.Dataset:
    """Without wall times: a trace's, and summary.nc's (prefixed by stage, e.g. metatest_time)."""
    ds = without_timing(ds)
    return ds.drop_vars([v for v in ds.data_vars if str(v).split("_", 1)[-1] in TIMING_VARS])
