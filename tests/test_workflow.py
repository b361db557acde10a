"""The Snakemake pipeline: lint, DAG shape, config errors, profiles, a tiny end-to-end run,
reruns of only the changed stages (asserted from dry-run reasons), and resume after a kill.

Snakemake runs in subprocesses, each in its own temporary working directory. The rerun tests
use a copy of the Snakefile, workflow/ and src/ so that editing package code does not touch
the repository.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr
import yaml

from safemeta import cli
from safemeta.config import SCHEMA_PATH
from safemeta.results import read_dataset, without_timing

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"
TINY = yaml.safe_load(TEST_CONFIG.read_text())
SEEDS = len(TINY["seeds"])
RUNS = len(TINY["scenarios"]) * len(TINY["methods"]) * SEEDS  # meta_train (and meta_test) jobs


def smk(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile", check: bool = True, env=None):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=None if env is None else
                         {**os.environ, **env})
    res.out = res.stdout + res.stderr
    if check:
        assert res.returncode == 0, res.out
    return res


def make_workdir(path: Path, config: dict | Path = TEST_CONFIG) -> Path:
    (path / "config").mkdir(parents=True)
    text = config.read_text() if isinstance(config, Path) else yaml.safe_dump(config)
    (path / "config" / "config.yaml").write_text(text)
    return path


def jobs(output: str) -> list[dict[str, str]]:
    """The jobs of a dry run: rule, wildcards, reason, resources (as printed)."""
    found = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if head:
            fields = dict(re.findall(r"^\s{4}(\w+): (.*)$", block, re.M))
            found.append({"rule": head[1], **fields})
    return found


def counts(output: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for job in jobs(output):
        out[job["rule"]] = out.get(job["rule"], 0) + 1
    return out


def wildcards(job: dict[str, str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in job.get("wildcards", "").split(", ") if kv)


def expected_counts(config: dict) -> dict[str, int]:
    seeds = len(config.get("seeds", [0]))
    grid = len(config["scenarios"]) * seeds
    runs = seeds * sum(len(m.get("scenarios") or config["scenarios"]) for m in config.get("methods", {}).values())
    single = seeds * sum(len(m.get("scenarios") or config["scenarios"]) for m in config.get("learners", {}).values())
    counts = {"sample_tasks": grid, "meta_train": runs, "meta_test": runs, "aggregate": 1, "plot": 1, "compare": 1,
              "all": 1}
    return {**counts, "single_task": single} if single else counts


# --------------------------------------------------------------------------- static checks
def test_lint_is_clean(tmp_path):
    res = smk(make_workdir(tmp_path), "--lint")
    assert "Congratulations, your workflow is in a good condition!" in res.out


def test_schema_is_the_package_schema():
    link = REPO / "workflow" / "schemas" / "config.schema.yaml"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == SCHEMA_PATH.resolve()


@pytest.mark.parametrize("source, args", [
    (REPO / "config" / "config.yaml", []),
    (REPO / "config" / "paper.yaml", ["--configfile", str(REPO / "config" / "paper.yaml"), "--replace-workflow-config"]),
    (TEST_CONFIG, []),
])
def test_dry_run_dag_matches_the_config(tmp_path, source, args):
    work = make_workdir(tmp_path, TEST_CONFIG if args else source)  # --configfile must replace it, not extend it
    res = smk(work, "-n", "--cores", "2", *args)
    config = yaml.safe_load(source.read_text())
    assert counts(res.out) == expected_counts(config)
    if not config.get("learners"):
        assert "single_task" not in counts(res.out)
    gpu_jobs = [j for j in jobs(res.out) if j["rule"] in ("meta_train", "single_task")]
    assert all("gpu=1" in j["resources"] for j in gpu_jobs)


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["metatest"].update(adapt_steps="five"), "metatest.adapt_steps"),
    (lambda c: c["scenarios"].update(nosuch={}), "scenarios.nosuch.distribution"),
    (lambda c: c["metatrain"].update(iteration=3), "metatrain.iteration"),
])
def test_bad_config_gives_one_line_naming_the_key(tmp_path, edit, key):
    config = yaml.safe_load(TEST_CONFIG.read_text())
    edit(config)
    res = smk(make_workdir(tmp_path, config), "-n", check=False)
    out = res.out
    assert res.returncode != 0
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and f"config key '{key}'" in errors[0], out
    assert "Traceback" not in out


# --------------------------------------------------------------------------- profiles
def _fake_job(resources: str, threads: int = 1):
    values = {}
    for item in resources.split(", "):
        name, value = item.split("=", 1)
        values[name] = int(value) if value.isdigit() else value

    class Resources(dict):
        __getattr__ = dict.__getitem__

    return SimpleNamespace(resources=Resources(values), threads=threads)


def test_slurm_profile_maps_gpu_rules_to_gpus(tmp_path):
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    res = smk(make_workdir(tmp_path), "-n", "--profile", str(REPO / "profiles" / "slurm"))
    by_rule = {j["rule"]: j for j in jobs(res.out)}
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "profile.yaml").read_text())
    params = {"run_uuid": "x", "slurm_logfile": "x.log", "comment_str": "x", "account": "-A acc",
              "partition": "-p part", "workdir": str(tmp_path)}
    for rule in ("meta_train", "meta_test"):
        wanted = profile["set-resources"][rule]
        job = _fake_job(by_rule[rule]["resources"], threads=profile["set-threads"][rule])
        assert job.resources["slurm_partition"] == "<gpu-partition>" and job.resources["runtime"] == wanted["runtime"]
        call = (get_submit_command(job, params) + set_gres_string(job)).replace("'", "")
        assert "--gpus=1" in call and f"--cpus-per-task={job.threads}" in call, call
        assert f"--mem {wanted['mem_mb']}" in call and f"-t {wanted['runtime']}" in call and "--ntasks" not in call
    tasks = _fake_job(by_rule["sample_tasks"]["resources"])
    tasks_call = get_submit_command(tasks, params) + set_gres_string(tasks)
    assert "--gpus" not in tasks_call and "--cpus-per-task=1" in tasks_call
    assert tasks.resources["slurm_partition"] == "<cpu-partition>"
    assert "resources" not in profile  # a global gpu limit would throttle the whole cluster run


def test_local_gpu_profile_limits_gpu_jobs(tmp_path):
    res = smk(make_workdir(tmp_path), "-n", "--profile", str(REPO / "profiles" / "local-gpu"))
    assert "Using profiles" in res.out
    profile = yaml.safe_load((REPO / "profiles" / "local-gpu" / "profile.yaml").read_text())
    assert profile["resources"]["gpu"] == 2
    train = [j for j in jobs(res.out) if j["rule"] == "meta_train"]
    assert train and all("gpu=1" in j["resources"] and j["threads"] == "3" for j in train)


# --------------------------------------------------------------------------- tiny end-to-end run
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A copy of the workflow, its software env and the package source, and a tiny run made with it."""
    root = tmp_path_factory.mktemp("pipeline")
    repo = root / "repo"
    repo.mkdir()
    for name in ("Snakefile", "environment.yml", "requirements.lock", "pyproject.toml"):
        shutil.copy(REPO / name, repo / name)
    for name in ("workflow", "profiles"):
        shutil.copytree(REPO / name, repo / name, symlinks=True)
    shutil.copytree(REPO / "src" / "safemeta", repo / "src" / "safemeta",
                    ignore=shutil.ignore_patterns("__pycache__", "*.TXT"))
    work = make_workdir(root / "work")
    smk(work, "--cores", "2", snakefile=repo / "Snakefile")
    return SimpleNamespace(repo=repo, work=work, snakefile=repo / "Snakefile")


def dry(pipeline) -> str:
    return smk(pipeline.work, "-n", snakefile=pipeline.snakefile).out


def test_end_to_end_writes_summary_figures_and_report(pipeline):
    config = TINY
    summary = read_dataset(pipeline.work / "results" / "summary.nc")
    assert list(summary.scenario.values) == sorted(config["scenarios"])
    assert list(summary.method_name.values) == list(config["methods"])
    assert list(summary.seed.values) == config["seeds"]
    assert summary.sizes["iteration"] == config["metatrain"]["iterations"] + 1
    assert summary.sizes["step"] == config["metatest"]["adapt_steps"] + 1
    n_tasks = {k: s["n_test_tasks"] for k, s in config["scenarios"].items()}
    assert summary.sizes["task"] == max(n_tasks.values())
    small = min(n_tasks, key=n_tasks.get)  # padded with NaN beyond its own tasks
    assert np.isnan(summary.metatest_reward.sel(scenario=small).isel(task=slice(n_tasks[small], None))).all()
    assert np.isfinite(summary.metatest_reward.sel(scenario=small).isel(task=slice(0, n_tasks[small]))).all()
    assert summary.attrs["padded"] == 1 and len(summary.attrs["code_hash"]) == 16
    seed = config["seeds"][-1]
    trace = read_dataset(pipeline.work / f"results/metatest/{small}/safemeta/seed{seed}/trace.nc")
    merged = summary.metatest_cost.sel(scenario=small, method_name="safemeta", seed=seed)  # keyword selection works
    np.testing.assert_array_equal(merged.isel(task=slice(0, n_tasks[small])).values, trace.cost.values)
    for name in ("metatrain", "metatest", "compute_time", "single_task", "comparison"):
        assert (pipeline.work / "results" / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (pipeline.work / "results" / "comparison.csv").read_text().splitlines()
    assert table[0].startswith("scenario,method,algorithm") and len(table) == 1 + RUNS // SEEDS
    assert "Nothing to be done" in dry(pipeline)
    smk(pipeline.work, "--report", "results/report.html", snakefile=pipeline.snakefile)
    html = (pipeline.work / "results" / "report.html").read_text()
    assert "metatest.png" in html and "Anytime safety holds when the bottom curve" in html
    assert "comparison.png" in html and "comparison.html" in html


# --------------------------------------------------------------------------- only-changed reruns
def edit_config(pipeline, change):
    path = pipeline.work / "config" / "config.yaml"
    original = path.read_text()
    config = yaml.safe_load(original)
    change(config)
    path.write_text(yaml.safe_dump(config))
    try:
        return jobs(dry(pipeline))
    finally:
        path.write_text(original)


def rule_counts(found: list[dict[str, str]]) -> dict[str, int]:
    return {r: sum(j["rule"] == r for j in found) for r in {j["rule"] for j in found}}


def test_metatest_change_reruns_meta_test_and_downstream_only(pipeline):
    found = edit_config(pipeline, lambda c: c["metatest"].update(adapt_steps=c["metatest"]["adapt_steps"] + 1))
    assert rule_counts(found) == {"meta_test": RUNS, "aggregate": 1, "plot": 1, "compare": 1, "all": 1}
    for job in found:
        if job["rule"] == "meta_test":
            assert job["reason"].startswith("Params have changed") and "metatest.adapt_steps=" in job["reason"]


def test_task_option_change_reruns_that_scenarios_chain_only(pipeline):
    found = edit_config(pipeline, lambda c: c["scenarios"]["grid"]["task_options"].update(slip=0.2))
    assert rule_counts(found) == {"sample_tasks": SEEDS, "meta_train": SEEDS, "meta_test": SEEDS, "aggregate": 1,
                                  "plot": 1, "compare": 1, "all": 1}
    assert {wildcards(j).get("scenario") for j in found} == {"grid", None}
    assert all(j["reason"].startswith("Params have changed") for j in found if j["rule"] == "sample_tasks")


DOWNSTREAM = {"aggregate": 1, "plot": 1, "compare": 1, "all": 1}
PIPELINE = ["sample_tasks", "meta_train", "meta_test", "aggregate", "plot", "compare", "all"]  # each after its inputs


@pytest.mark.parametrize("module, changed", [
    ("evaluate.py", {"meta_train": RUNS, "meta_test": RUNS}),   # meta-training evaluates through the loop
    ("adaptation/dual_pgd.py", {"meta_train": RUNS, "meta_test": RUNS}),
    ("tasks/tabular.py", {"sample_tasks": RUNS, "meta_train": RUNS, "meta_test": RUNS}),
    ("plots.py", {"plot": 1, "compare": 1}),
    ("comparison.py", {"compare": 1}),
])
def test_code_edit_reruns_the_rules_that_run_it(pipeline, module, changed):
    path = pipeline.repo / "src" / "safemeta" / module
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        first = min(map(PIPELINE.index, changed))
        downstream = {r: n for r, n in DOWNSTREAM.items() if PIPELINE.index(r) > first}
        assert rule_counts(jobs(dry(pipeline))) == {**downstream, **changed}
        # A job's reason names its params only when no upstream job reruns, so look at each
        # rule with its upstream rules disallowed: its own code hash must have changed.
        for rule, n in changed.items():
            allowed = PIPELINE[PIPELINE.index(rule):]
            found = jobs(smk(pipeline.work, "-n", "--allowed-rules", *allowed, snakefile=pipeline.snakefile).out)
            own = [j for j in found if j["rule"] == rule]
            assert len(own) == n and all(j["reason"].startswith("Params have changed") for j in own), own
    finally:
        path.write_text(original)


def test_touch_without_change_reruns_nothing(pipeline):
    later = time.time() + 10
    paths = [pipeline.work / "config" / "config.yaml", pipeline.snakefile,
             *pipeline.work.glob("results/tasks/*/*.json"), *(pipeline.repo / "src").rglob("*.py")]
    for path in paths:
        os.utime(path, (later, later))
    assert "Nothing to be done" in dry(pipeline)


# --------------------------------------------------------------------------- resume after a kill
KILL_CONFIG = {
    "seeds": [0], "device": "cpu",
    "scenarios": {"rand": {"distribution": "tabular_random", "task_options": {"num_states": 6},
                           "n_train_tasks": 8, "n_test_tasks": 3}},
    "methods": {"safemeta": {"meta_gradient": "eq6"}},
    "metatrain": {"iterations": 30, "tasks_per_iteration": 3, "max_kl": 0.02},
    "metatest": {"adapt_steps": 3},
}


def test_killed_meta_train_resumes_to_the_uninterrupted_result(tmp_path):
    work = make_workdir(tmp_path / "work", KILL_CONFIG)
    target = "results/metatrain/rand/safemeta/seed0/trace.nc"
    checkpoint = work / "results/checkpoints/rand/safemeta/seed0.pt"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--cores", "1", target]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, "snakemake ended before meta-train wrote its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its job: a hard kill mid-training
        proc.wait()
    assert not (work / target).exists() and checkpoint.exists()

    smk(work, "--unlock")
    rerun = smk(work, "--cores", "1", target)  # rerun-incomplete comes from the workflow profile
    assert "meta_train" in rerun.out
    log = (work / "logs/meta_train/rand/safemeta/seed0.log").read_text()
    assert "resuming from results/checkpoints/rand/safemeta/seed0.pt" in log
    assert not checkpoint.exists()

    tasks = work / "results/tasks/rand/seed0.json"
    assert cli.main(["meta-train", "--config", str(work / "config/config.yaml"), "--scenario", "rand", "--method",
                     "safemeta", "--seed", "0", "--tasks", str(tasks), "--out-dir", str(tmp_path / "ref"),
                     "--checkpoint", str(tmp_path / "ref.pt"), "--quiet"]) == 0
    xr.testing.assert_identical(without_timing(read_dataset(work / target)),
                                without_timing(read_dataset(tmp_path / "ref" / "trace.nc")))


# --------------------------------------------------------------------------- between-workflow cache
def cache_use(output: str) -> tuple[set[str], set[str]]:
    """(outputs taken from the cache, outputs of jobs that ran and were stored in it); a stored
    output is symlinked back from the cache too."""
    stored = set(re.findall(r"Moving output file (\S+) to cache", output))
    return set(re.findall(r"Symlinking output file (\S+) from cache", output)) - stored, stored


def test_second_workflow_takes_a_shared_meta_train_from_the_cache(tmp_path):
    """Two working directories, one SNAKEMAKE_OUTPUT_CACHE: the second config shares scenario
    `rand`, method and seed 0 with the first, so sample_tasks and meta_train come from the cache
    (symlinks, no log), while its own meta-test setting reruns meta_test; another method option
    misses the cache for meta_train, and another seed for sample_tasks."""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"SNAKEMAKE_OUTPUT_CACHE": str(cache)}
    train = "results/metatrain/rand/safemeta/seed0"
    tasks, metatest = "results/tasks/rand/seed0.json", "results/metatest/rand/safemeta/seed0/trace.nc"
    first = make_workdir(tmp_path / "first", TINY)
    taken, stored = cache_use(smk(first, "--cache", "--cores", "2", metatest, env=env).out)
    assert not taken and stored == {tasks, f"{train}/policy.pt", f"{train}/trace.nc", metatest}

    second_config = {**TINY, "scenarios": {"rand": TINY["scenarios"]["rand"]},
                     "metatest": {**TINY["metatest"], "adapt_steps": TINY["metatest"]["adapt_steps"] + 1}}
    second = make_workdir(tmp_path / "second", second_config)
    taken, stored = cache_use(smk(second, "--cache", "--cores", "2", metatest, env=env).out)
    assert taken == {tasks, f"{train}/policy.pt", f"{train}/trace.nc"} and stored == {metatest}
    for name in ("policy.pt", "trace.nc"):
        path = second / train / name
        assert path.is_symlink() and Path(os.readlink(path)).parent == cache, path
        assert path.read_bytes() == (first / train / name).read_bytes()
    assert (second / "logs/meta_train/rand/safemeta/seed0.log").read_text() == ""  # created, never written

    third_config = {**second_config, "seeds": [0, 1],
                    "methods": {"safemeta": {**TINY["methods"]["safemeta"], "meta_gradient": "full"}}}
    third = make_workdir(tmp_path / "third", third_config)
    other_seed = "results/tasks/rand/seed1.json"  # the same config part: only the seed tells them apart
    taken, stored = cache_use(smk(third, "--cache", "--cores", "2", f"{train}/trace.nc", other_seed, env=env).out)
    assert taken == {tasks} and stored == {f"{train}/policy.pt", f"{train}/trace.nc", other_seed}
    assert (third / other_seed).read_bytes() != (third / tasks).read_bytes()
    assert "wrote results/metatrain/rand" in (third / "logs/meta_train/rand/safemeta/seed0.log").read_text()
