"""The `safemeta` CLI on a tabular scenario: files, formats, errors, resume."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from safemeta import cli
from safemeta.results import read_dataset, without_timing

CONFIG = {
    "scenarios": {"rand": {"distribution": "tabular_random", "task_options": {"num_states": 6},
                           "n_train_tasks": 8, "n_test_tasks": 4, "adaptation": {"dual_pgd": {"lam": 1.0, "lam_c": 1.0}}}},
    "methods": {"safemeta": {"meta_gradient": "eq6"}},
    "metatrain": {"iterations": 6, "tasks_per_iteration": 3, "max_kl": 0.02},
    "metatest": {"adapt_steps": 5},
}


def run(*args: str) -> int:
    return cli.main(list(args))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return tmp_path


def pipeline(workdir: Path, config: str | None = None, out: str = "r") -> Path:
    config = config or str(workdir / "config.yaml")
    base = ["--config", config, "--scenario", "rand", "--seed", "0"]
    tasks, res = workdir / out / "tasks.json", workdir / out
    assert run("tasks", *base, "--out", str(tasks)) == 0
    assert run("meta-train", *base, "--method", "safemeta", "--tasks", str(tasks), "--out-dir", str(res / "mt"),
               "--quiet") == 0
    assert run("meta-test", *base, "--method", "safemeta", "--tasks", str(tasks), "--policy",
               str(res / "mt" / "policy.pt"), "--out", str(res / "test.nc")) == 0
    return res


def test_tasks_meta_train_meta_test_write_readable_files(workdir):
    res = pipeline(workdir)
    tasks = json.loads((res / "tasks.json").read_text())
    assert tasks["format"] == "safemeta.tasks/1" and len(tasks["train"]) == 8 and len(tasks["test"]) == 4
    trace = read_dataset(res / "mt" / "trace.nc")
    assert dict(trace.sizes) == {"iteration": 7, "task": 4, "constraint": 1}
    for name in ("reward", "cost", "meta_reward", "meta_cost", "u", "limit", "step_kl", "time_compute"):
        assert "units" in trace[name].attrs and "long_name" in trace[name].attrs
    assert trace.attrs["seed"] == 0 and len(trace.attrs["code_hash"]) == 16
    assert json.loads(trace.attrs["config"])["metatrain"]["iterations"] == 6      # resolved config
    assert "scenarios" in json.loads(trace.attrs["config"])
    test = read_dataset(res / "test.nc")
    assert dict(test.sizes) == {"task": 4, "step": 6, "constraint": 1}
    assert np.isnan(test.u.isel(step=0)).all() and np.isfinite(test.u.isel(step=slice(1, None))).all()
    # k = 0 of the meta-test is the trained meta-policy evaluated exactly: it equals the last training record
    np.testing.assert_allclose(test.reward.isel(step=0), trace.meta_reward.isel(iteration=-1))
    policy = torch.load(res / "mt" / "policy.pt", weights_only=False)
    assert policy["kind"] == "tabular_softmax" and policy["logits"].shape == (6, 3)
    assert not list(res.rglob("*.tmp")) and not (res / "mt" / "checkpoint.pt").exists()


def test_same_seed_same_outputs(workdir):
    a, b = pipeline(workdir, out="a"), pipeline(workdir, out="b")
    assert (a / "tasks.json").read_text().split('"provenance"')[0] == (b / "tasks.json").read_text().split('"provenance"')[0]
    for rel in ("mt/trace.nc", "test.nc"):
        xr.testing.assert_identical(without_timing(read_dataset(a / rel)), without_timing(read_dataset(b / rel)))


def test_inline_json_config_equals_file_config(workdir):
    a = pipeline(workdir, out="a")
    b = pipeline(workdir, config=json.dumps(CONFIG), out="b")
    xr.testing.assert_identical(without_timing(read_dataset(a / "test.nc")), without_timing(read_dataset(b / "test.nc")))


def test_interrupted_meta_train_resumes_to_the_same_result(workdir, monkeypatch, capsys):
    ref = pipeline(workdir, out="ref")
    base = ["--config", str(workdir / "config.yaml"), "--scenario", "rand", "--seed", "0", "--method", "safemeta",
            "--tasks", str(ref / "tasks.json"), "--out-dir", str(workdir / "killed"), "--quiet"]
    real = cli.train

    def dies_after_three(learner, state, on_iteration):
        def hook(st):
            on_iteration(st)           # the checkpoint is written ...
            if st.iteration == 3:
                raise KeyboardInterrupt  # ... then the job is killed
        return real(learner, state, hook)

    monkeypatch.setattr(cli, "train", dies_after_three)
    capsys.readouterr()
    assert run("meta-train", *base) == 130
    lines = capsys.readouterr().err.strip().splitlines()   # one line, no traceback
    assert lines[-1].startswith("safemeta meta-train: interrupted: ") and "checkpoint.pt holds 3 of 6" in lines[-1]
    assert "snakemake --unlock" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert (workdir / "killed" / "checkpoint.pt").exists() and not (workdir / "killed" / "trace.nc").exists()
    monkeypatch.setattr(cli, "train", real)
    assert run("meta-train", *base) == 0
    xr.testing.assert_identical(without_timing(read_dataset(workdir / "killed" / "trace.nc")),
                                without_timing(read_dataset(ref / "mt" / "trace.nc")))


def test_stale_checkpoint_of_another_config_is_ignored(workdir, capsys):
    ref = pipeline(workdir, out="ref")
    ckpt = workdir / "ckpt.pt"
    torch.save({"identity": {"config": "something else"}, "state": {}}, ckpt)
    assert run("meta-train", "--config", str(workdir / "config.yaml"), "--scenario", "rand", "--seed", "0",
               "--method", "safemeta", "--tasks", str(ref / "tasks.json"), "--out-dir", str(workdir / "o"),
               "--checkpoint", str(ckpt), "--quiet") == 0
    assert "ignoring checkpoint" in capsys.readouterr().err
    xr.testing.assert_identical(without_timing(read_dataset(workdir / "o" / "trace.nc")),
                                without_timing(read_dataset(ref / "mt" / "trace.nc")))


@pytest.mark.parametrize("command", ["tasks", "meta-train", "meta-test", "single-task"])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "safemeta.cli", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--config" in out.stdout and "--seed" in out.stdout


def test_top_level_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "safemeta.cli", "--help"], capture_output=True, text=True)
    for command in ("tasks", "meta-train", "meta-test", "single-task", "aggregate", "plot"):
        assert command in out.stdout


def _with(config: dict, **sections) -> dict:
    config = json.loads(json.dumps(config))
    config.update(sections)
    return config


def test_single_task_trains_from_a_fresh_policy_on_the_first_test_tasks(workdir):
    config = _with(CONFIG, learners={"scratch": {"algorithm": "dual_pgd", "iterations": 3, "n_tasks": 2}})
    (workdir / "c.yaml").write_text(yaml.safe_dump(config))
    base = ["--config", str(workdir / "c.yaml"), "--scenario", "rand", "--seed", "0"]
    assert run("tasks", *base, "--out", str(workdir / "t.json")) == 0
    assert run("single-task", *base, "--learner", "scratch", "--tasks", str(workdir / "t.json"),
               "--out", str(workdir / "s.nc")) == 0
    trace = read_dataset(workdir / "s.nc")
    assert dict(trace.sizes) == {"task": 2, "step": 4, "constraint": 1}
    assert trace.attrs["stage"] == "single_task" and trace.attrs["learner"] == "scratch"
    uniform = trace.reward.isel(step=0).values          # the fresh exact policy is the uniform softmax
    tasks = json.loads((workdir / "t.json").read_text())["test"][:2]
    from safemeta.tasks import Task, get_distribution
    from safemeta.tasks.tabular import evaluate
    dist = get_distribution("tabular_random", num_states=6)
    expected = [evaluate(dist.cmdp(Task.from_json(t)), np.full((6, 3), 1 / 3)).J for t in tasks]
    np.testing.assert_allclose(uniform, expected, rtol=1e-12)
    assert np.isfinite(trace.u.isel(step=slice(1, None))).all()


def test_meta_test_adapter_and_method_overrides_of_the_operator(workdir):
    """metatest.adapter names the meta-test's operator; a method's `adaptation` overrides (the
    delta sweep of Fig. 6) change meta-training only, over the same tasks."""
    config = _with(CONFIG, methods={"safemeta": {"meta_gradient": "eq6"},
                                    "wide": {"algorithm": "safemeta", "meta_gradient": "eq6",
                                             "adaptation": {"delta": 0.5}}})
    config["scenarios"]["rand"]["adaptation"]["dual_pgd"].update(lam=0.3, lam_c=0.3)   # constraints bind
    (workdir / "c.yaml").write_text(yaml.safe_dump(config))
    base = ["--config", str(workdir / "c.yaml"), "--scenario", "rand", "--seed", "0"]
    assert run("tasks", *base, "--out", str(workdir / "t.json")) == 0
    for method in ("safemeta", "wide"):
        assert run("meta-train", *base, "--method", method, "--tasks", str(workdir / "t.json"), "--out-dir",
                   str(workdir / method), "--quiet") == 0
        assert run("meta-test", *base, "--method", method, "--tasks", str(workdir / "t.json"), "--policy",
                   str(workdir / method / "policy.pt"), "--out", str(workdir / f"{method}.nc")) == 0
    narrow, wide = (read_dataset(workdir / method / "trace.nc") for method in ("safemeta", "wide"))
    assert json.loads(wide.attrs["config"])["scenarios"]["rand"]["adaptation"]["dual_pgd"]["delta"] == 0.5  # effective
    np.testing.assert_array_equal(narrow.limit, wide.limit)                                  # one set of tasks
    # meta-training adapts with the method's delta: the looser constraint needs smaller multipliers
    assert float(narrow.u.max()) > 0 and (wide.u.values <= narrow.u.values + 1e-12).all()
    assert float(wide.u.max()) < float(narrow.u.max())
    test = read_dataset(workdir / "wide.nc")
    assert test.attrs["adapter"] == "dual_pgd"
    policy = torch.load(workdir / "wide" / "policy.pt", weights_only=False)["logits"].numpy()
    from safemeta.tasks import Task, get_distribution
    from conftest import exact_sequence
    task = Task.from_json(json.loads((workdir / "t.json").read_text())["test"][0])
    # the meta-test runs with metatest.delta = 0, not the method's 0.5
    seq = exact_sequence(get_distribution("tabular_random", num_states=6).cmdp(task), policy, 5, lam=0.3, lam_c=0.3,
                         delta=0.0)
    np.testing.assert_allclose(test.cost.isel(task=0).values, seq.cost, rtol=1e-12)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["scenarios"]["rand"]["adaptation"]["dual_pgd"].update(kl_target=0.03),
     "config key 'scenarios.rand.adaptation.dual_pgd.kl_target': not read by operator dual_pgd on exact scenarios"),
    (lambda c: c["scenarios"]["rand"].update(metatrain={"eval_every": 2}),
     "config key 'scenarios.rand.metatrain.eval_every': not read by any method on this scenario"),
    (lambda c: c["methods"]["safemeta"].update(adaptation={"fit_steps": 2}),
     "config key 'methods.safemeta.adaptation.fit_steps': not read by operator dual_pgd on exact scenarios"),
    (lambda c: c["methods"]["safemeta"].update(meta_gradient="hessian"), "config key 'methods.safemeta.meta_gradient'"),
    (lambda c: c["methods"]["safemeta"].update(algorithm="nope"), "config key 'methods.safemeta': unknown"),
    (lambda c: c["methods"]["safemeta"].update(scenarios=["elsewhere"]), "config key 'methods.safemeta.scenarios'"),
    (lambda c: c["metatest"].update(adapter="nope"), "config key 'metatest.adapter': unknown adaptation operator"),
    (lambda c: c["scenarios"]["rand"].update(adaptation={"lam": 1.0}),
     "config key 'scenarios.rand.adaptation.lam': unknown adaptation operator"),
    (lambda c: c["scenarios"]["rand"].update(methods={"other": {}}), "config key 'scenarios.rand.methods.other'"),
])
def test_options_an_algorithm_does_not_read_are_rejected_naming_the_key(edit, message):
    from safemeta.config import ConfigError, load_config

    config = json.loads(json.dumps(CONFIG))
    edit(config)
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sampled_scenarios_refuse_the_exact_only_meta_gradients():
    from safemeta.config import ConfigError, load_config

    config = {"scenarios": {"p": {"distribution": "point_circle_diff", "task_options": {"horizon": 10}}},
              "methods": {"safemeta": {"meta_gradient": "eq6"}}}
    with pytest.raises(ConfigError, match="config key 'methods.safemeta.meta_gradient': meta_gradient 'eq6' is not "
                                          "available on sampled scenarios"):
        load_config(config)
    config["methods"]["safemeta"]["meta_gradient"] = "first_order"
    config["scenarios"]["p"]["adaptation"] = {"dual_pgd": {"lam": 2.0}}
    with pytest.raises(ConfigError, match="config key 'scenarios.p.adaptation.dual_pgd.lam': has no effect here: "
                                          "kl_target is set"):
        load_config(config)
    config["scenarios"]["p"]["adaptation"]["dual_pgd"]["kl_target"] = None   # lam as given (the paper's Table 2)
    load_config(config)
    config["scenarios"]["t"] = {"distribution": "tabular_random", "methods": {"safemeta": {"meta_gradient": "eq6"}}}
    config["methods"]["safemeta"]["meta_gradient"] = "first_order"
    load_config(config)   # per-scenario override: eq6 where it is exact, line 7 elsewhere


@pytest.mark.parametrize("change,message", [
    ({"metatrain": {"iterations": 0}}, "config key 'metatrain.iterations'"),
    ({"metatrain": {"iteratons": 3}}, "config key 'metatrain.iteratons': unknown key"),
    ({"metatest": {"adapt_steps": "ten"}}, "config key 'metatest.adapt_steps': 'ten' is not of type 'integer'"),
    ({"scenarios": {"rand": {"distribution": "no_such_thing"}}}, "unknown task distribution 'no_such_thing'"),
    ({"scenarios": {"rand": {"distribution": "tabular_random", "task_options": {"num_statez": 4}}}},
     "config key 'scenarios.rand.task_options'"),
])
def test_bad_config_gives_one_line_naming_the_key(tmp_path, change, message):
    config = json.loads(json.dumps(CONFIG))
    for section, value in change.items():
        config[section] = value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "safemeta.cli", "tasks", "--config", str(tmp_path / "bad.yaml"),
                          "--scenario", "rand", "--seed", "0", "--out", str(tmp_path / "t.json")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not (tmp_path / "t.json").exists()


def test_missing_and_mismatched_inputs_are_named(workdir, capsys):
    base = ["--config", str(workdir / "config.yaml"), "--scenario", "rand", "--seed", "0", "--method", "safemeta"]
    assert run("meta-train", *base, "--tasks", str(workdir / "nope.json"), "--out-dir", str(workdir / "o")) == 2
    assert "nope.json does not exist" in capsys.readouterr().err
    assert run("meta-train", *base[:2], "--scenario", "other", *base[4:], "--tasks", "x", "--out-dir", "o") == 2
    assert "config key 'scenarios.other': not defined" in capsys.readouterr().err
