"""No silent wrong results (issue 16): one case per failure a user met, with the expected one
line, warning or behaviour, so that none of them can come back."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from safemeta import cli
from safemeta.checks import CheckSettings, RunChecks, RunStopped
from safemeta.config import ConfigError, load_config, settings, stage_config
from safemeta.console import Console
from safemeta.inputs import InputError, check_architecture
from safemeta.plugins import check_grid, part_params
from safemeta.policies import GaussianMLPPolicy
from safemeta.results import read_dataset

CONFIG = {
    "scenarios": {"rand": {"distribution": "tabular_random", "task_options": {"num_states": 6},
                           "n_train_tasks": 8, "n_test_tasks": 4, "adaptation": {"dual_pgd": {"lam": 1.0, "lam_c": 1.0}}}},
    "methods": {"safemeta": {"meta_gradient": "eq6"}},
    "metatrain": {"iterations": 6, "tasks_per_iteration": 3, "max_kl": 0.02},
    "metatest": {"adapt_steps": 2},
}


def write_config(path: Path, change=lambda c: None) -> str:
    config = copy.deepcopy(CONFIG)
    change(config)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def one_error_line(capsys, command: str) -> str:
    """The command's stderr is one error line (no traceback); returns it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and not any("Traceback" in line for line in err), err
    assert err[-1].startswith(f"safemeta {command}: "), err
    return err[-1]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Tasks (seed 0), a meta-trained policy and its meta-test trace of CONFIG."""
    root = tmp_path_factory.mktemp("made")
    config = write_config(root / "config.yaml")
    base = ["--config", config, "--scenario", "rand", "--seed", "0"]
    assert cli.main(["tasks", *base, "--out", str(root / "tasks.json")]) == 0
    assert cli.main(["meta-train", *base, "--method", "safemeta", "--tasks", str(root / "tasks.json"),
                     "--out-dir", str(root / "mt"), "--quiet"]) == 0
    assert cli.main(["meta-test", *base, "--method", "safemeta", "--tasks", str(root / "tasks.json"),
                     "--policy", str(root / "mt" / "policy.pt"), "--out", str(root / "test.nc")]) == 0
    return root


def meta_train(config: str, tasks: Path, out: Path, seed: int = 0) -> int:
    return cli.main(["meta-train", "--config", config, "--scenario", "rand", "--seed", str(seed), "--method", "safemeta",
                     "--tasks", str(tasks), "--out-dir", str(out), "--quiet"])


# --------------------------------------------------------------------------- 1. checkpoints
def test_checkpoint_of_other_code_restarts_and_torn_writes_are_removed(made, tmp_path, monkeypatch, capsys):
    config, out = str(made / "config.yaml"), tmp_path / "mt"
    real = cli.train

    def dies_after_two(learner, state, hook):
        def h(st):
            hook(st)
            if st.iteration == 2:
                raise KeyboardInterrupt
        return real(learner, state, h)

    monkeypatch.setattr(cli, "train", dies_after_two)
    assert meta_train(config, made / "tasks.json", out) == 130
    assert (out / "checkpoint.pt").exists()
    torn = out / ".checkpoint.pt.abc123.tmp"      # what a kill during torch.save leaves
    torn.write_bytes(b"half")
    monkeypatch.setattr(cli, "train", real)
    monkeypatch.setattr(cli, "stage_code_hash", lambda *a, **k: "0123456789abcdef")   # the package was edited
    capsys.readouterr()
    assert meta_train(config, made / "tasks.json", out) == 0
    err = capsys.readouterr().err
    assert "ignoring checkpoint" in err and "other code" in err and "resuming" not in err
    assert not torn.exists() and "removed 1 temporary file" in err
    trace = read_dataset(out / "trace.nc")
    assert trace.attrs["stage_code_hash"] == "0123456789abcdef"
    # restarted from iteration 0 under the new code: the uninterrupted run's result
    np.testing.assert_array_equal(trace.reward, read_dataset(made / "mt" / "trace.nc").reward)


# --------------------------------------------------------------------------- 2. inputs vs command
def test_tasks_file_checked_against_config_and_seed(made, tmp_path, capsys):
    six = made / "tasks.json"
    five = write_config(tmp_path / "five.yaml", lambda c: c["scenarios"]["rand"]["task_options"].update(num_states=5))
    assert meta_train(five, six, tmp_path / "a") == 2
    line = one_error_line(capsys, "meta-train")
    assert "task option num_states = 6" in line and "'scenarios.rand.task_options.num_states' says 5" in line
    assert meta_train(str(made / "config.yaml"), six, tmp_path / "b", seed=1) == 2
    assert "sampled with seed 0; the command says --seed 1" in one_error_line(capsys, "meta-train")
    more = write_config(tmp_path / "more.yaml", lambda c: c["scenarios"]["rand"].update(n_test_tasks=5))
    assert meta_train(more, six, tmp_path / "c") == 2
    assert "holds 4 test tasks; config key 'scenarios.rand.n_test_tasks' says 5" in one_error_line(capsys, "meta-train")


@pytest.mark.parametrize("content, message", [
    (lambda t: [t], "is not a safemeta.tasks/1 file"),
    (lambda t: {k: v for k, v in t.items() if k != "test"}, "lacks its list of test tasks"),
    (lambda t: {**t, "test": []}, "holds 0 test tasks"),
])
def test_malformed_tasks_file_is_one_line(made, tmp_path, capsys, content, message):
    bad = tmp_path / "tasks.json"
    bad.write_text(json.dumps(content(json.loads((made / "tasks.json").read_text()))))
    assert meta_train(str(made / "config.yaml"), bad, tmp_path / "mt") == 2
    assert message in one_error_line(capsys, "meta-train")


def test_float_for_an_integer_option_is_refused(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", lambda c: c["scenarios"]["rand"]["task_options"].update(num_states=5.5))
    assert cli.main(["tasks", "--config", config, "--scenario", "rand", "--seed", "0", "--out", str(tmp_path / "t")]) == 2
    line = one_error_line(capsys, "tasks")
    assert "scenarios.rand.task_options" in line and "'num_states' must be an integer, got 5.5" in line


def test_policy_architecture_checked_against_config():
    trained, configured = GaussianMLPPolicy(4, 2, hidden=(8,)), GaussianMLPPolicy(4, 2, hidden=(16, 16))
    with pytest.raises(InputError, match=r"has hidden \[8\]; config key 'scenarios.s.policy.hidden' says \[16, 16\]"):
        check_architecture("p.pt", trained, configured, "s")
    with pytest.raises(InputError, match="has obs_dim 4; the tasks of scenario s have 5"):
        check_architecture("p.pt", GaussianMLPPolicy(4, 2, hidden=(8,)), GaussianMLPPolicy(5, 2, hidden=(8,)), "s")
    check_architecture("p.pt", trained, GaussianMLPPolicy(4, 2, hidden=(8,)), "s")   # the same form passes


def test_provenance_records_the_inputs_read(made):
    trace = read_dataset(made / "test.nc")
    inputs = json.loads(trace.attrs["inputs"])
    tasks = json.loads((made / "tasks.json").read_text())
    assert inputs["tasks"]["seed"] == 0 and inputs["tasks"]["stage"] == "tasks"
    assert inputs["tasks"]["code_hash"] == tasks["provenance"]["code_hash"]
    assert inputs["policy"]["stage"] == "meta_train" and len(inputs["policy"]["sha256"]) == 16
    assert json.loads(trace.attrs["config"])["scenarios"]["rand"]["task_options"]["num_states"] == 6


def test_policy_of_another_seed_is_refused(made, tmp_path, capsys):
    assert cli.main(["meta-test", "--config", str(made / "config.yaml"), "--scenario", "rand", "--seed", "0",
                     "--method", "safemeta", "--tasks", str(made / "tasks.json"), "--policy",
                     str(made / "mt" / "policy.pt"), "--out", str(tmp_path / "ok.nc")]) == 0
    other = tmp_path / "t1.json"
    assert cli.main(["tasks", "--config", str(made / "config.yaml"), "--scenario", "rand", "--seed", "1",
                     "--out", str(other)]) == 0
    capsys.readouterr()
    assert cli.main(["meta-test", "--config", str(made / "config.yaml"), "--scenario", "rand", "--seed", "1",
                     "--method", "safemeta", "--tasks", str(other), "--policy", str(made / "mt" / "policy.pt"),
                     "--out", str(tmp_path / "x.nc")]) == 2
    assert "was meta-trained for seed 0; the command says --seed 1" in one_error_line(capsys, "meta-test")


# --------------------------------------------------------------------------- 3. degenerate problems
@pytest.mark.parametrize("scenario, options, message", [
    ("point_circle_diff", {"cost_limit": 0}, "'cost_limit' 0 can never be met"),
    ("point_circle_diff", {"cost_limit": -1.0}, "'cost_limit' -1 can never be met"),
    ("tabular_random", {"limit_fraction": [0.0, 0.5]}, "must have 0 < low <= high"),
    ("tabular_grid", {"limit_fraction": [-0.2, 0.5]}, "must have 0 < low <= high"),
])
def test_limit_no_policy_meets_is_refused_at_validation(scenario, options, message):
    with pytest.raises(ConfigError, match=f"config key 'scenarios.{scenario}.task_options': .*{message}"):
        load_config({"scenarios": {scenario: {"task_options": options}}, "methods": {"safemeta": {}}})


def checks(**given) -> RunChecks:
    values = {"max_infeasible_share": 0.5, "infeasible_evaluations": 2, "stalled_iterations": 3, **given}
    return RunChecks(settings(CheckSettings, values), "[meta-train s/m seed 0]", np.full((4, 1), 2.5))


def test_infeasible_adaptation_stops_meta_train_naming_scenario_iteration_and_limit():
    run = checks()
    run.observe({"iteration": 0, "feasible": np.array([0.0, 0.0, 0.0, 1.0])})          # one evaluation: goes on
    run.observe({"iteration": 1, "feasible": np.full(4, np.nan)})                        # no evaluation here
    with pytest.raises(RunStopped, match=r"\[meta-train s/m seed 0\]: stopped at iteration 2: .* on 3 of 4 "
                                         r"evaluation tasks, at 2 evaluations in a row, with d = 2.5"):
        run.observe({"iteration": 2, "feasible": np.array([0.0, 0.0, 0.0, 1.0])})
    calm = checks()
    for n in range(5):   # half infeasible is not above the share
        assert calm.observe({"iteration": n, "feasible": np.array([0.0, 0.0, 1.0, 1.0])}) == []


def test_meta_train_on_an_unreachable_limit_stops_with_one_line(tmp_path, capsys):
    """A limit just above the exact least cost: the adaptation is infeasible on every task."""
    config = write_config(tmp_path / "c.yaml", lambda c: c["scenarios"]["rand"]["task_options"].update(
        limit_fraction=[0.001, 0.002]))
    base = ["--config", config, "--scenario", "rand", "--seed", "0"]
    assert cli.main(["tasks", *base, "--out", str(tmp_path / "t.json")]) == 0
    capsys.readouterr()
    assert meta_train(config, tmp_path / "t.json", tmp_path / "mt") == 2
    line = one_error_line(capsys, "meta-train")
    assert "[meta-train rand/safemeta seed 0]: stopped at iteration 1: the one-step adaptation is infeasible" in line
    assert "on 4 of 4 evaluation tasks" in line and not (tmp_path / "mt" / "trace.nc").exists()


def test_no_accepted_step_warns_once_per_stretch():
    run = checks()
    said = [run.observe({"iteration": n, "step_accepted": False, "grad_norm": 0.0}) for n in range(6)]
    assert [len(s) for s in said] == [0, 0, 1, 0, 0, 0]
    assert "no meta-step accepted in iterations 0-2 with a zero meta-gradient" in said[2][0]
    run.observe({"iteration": 6, "step_accepted": True, "grad_norm": 1.0})
    said = [run.observe({"iteration": n, "step_accepted": False, "grad_norm": 0.3}) for n in range(7, 10)]
    assert "iterations 7-9 (gradient norm 0.3" in said[-1][0]


def test_resumed_run_is_checked_as_the_uninterrupted_one():
    records = [{"iteration": n, "step_accepted": False, "grad_norm": 0.0} for n in range(2)]
    run = checks()
    run.replay(records)
    assert len(run.observe({"iteration": 2, "step_accepted": False, "grad_norm": 0.0})) == 1


# --------------------------------------------------------------------------- 4. one line, status 2
@pytest.mark.parametrize("content", [b"PK\x03\x04 torn", b"not a torch file at all"])
def test_torn_or_foreign_policy_file_is_one_line(made, tmp_path, capsys, content):
    bad = tmp_path / "policy.pt"
    bad.write_bytes((made / "mt" / "policy.pt").read_bytes()[:300] if content.startswith(b"PK") else content)
    assert cli.main(["meta-test", "--config", str(made / "config.yaml"), "--scenario", "rand", "--seed", "0",
                     "--method", "safemeta", "--tasks", str(made / "tasks.json"), "--policy", str(bad),
                     "--out", str(tmp_path / "x.nc")]) == 2
    assert f"policy file {bad} is not a readable torch file" in one_error_line(capsys, "meta-test")


def test_torn_trace_or_summary_is_one_line(made, tmp_path, capsys):
    torn = tmp_path / "trace.nc"
    torn.write_bytes((made / "test.nc").read_bytes()[:500])
    assert cli.main(["aggregate", str(torn), "--out", str(tmp_path / "s.nc")]) == 2
    assert "is not a readable netCDF file" in one_error_line(capsys, "aggregate")
    assert cli.main(["plot", "--summary", str(torn), "--out-dir", str(tmp_path / "fig")]) == 2
    assert f"summary {torn} is not a readable netCDF file" in one_error_line(capsys, "plot")


def test_config_that_runs_nothing_and_bad_task_options_fail_at_validation():
    empty = load_config({"scenarios": {"tabular_random": {}}, "methods": {}})
    with pytest.raises(ConfigError, match="config key 'methods': no method or learner runs"):
        check_grid(empty)
    with pytest.raises(ConfigError, match=r"config key 'scenarios.tabular_grid.task_options': .*unknown option 'sizee'"):
        load_config({"scenarios": {"tabular_grid": {"task_options": {"sizee": 3}}}, "methods": {"safemeta": {}}})


def test_diverged_run_and_interrupt_are_one_line(made, tmp_path, monkeypatch, capsys):
    def diverges(learner, state, hook):
        raise FloatingPointError("adaptation KL is NaN at iteration 3 (task 1)")

    monkeypatch.setattr(cli, "train", diverges)
    assert meta_train(str(made / "config.yaml"), made / "tasks.json", tmp_path / "a") == 2
    assert one_error_line(capsys, "meta-train").endswith("error: adaptation KL is NaN at iteration 3 (task 1)")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "meta_test", interrupted)
    assert cli.main(["meta-test", "--config", str(made / "config.yaml"), "--scenario", "rand", "--seed", "0",
                     "--method", "safemeta", "--tasks", str(made / "tasks.json"), "--policy",
                     str(made / "mt" / "policy.pt"), "--out", str(tmp_path / "x.nc")]) == 130
    assert "interrupted: nothing written" in one_error_line(capsys, "meta-test")


def test_internal_error_keeps_its_traceback(made, tmp_path, monkeypatch):
    def bug(learner, state, hook):
        raise IndexError("a bug")

    monkeypatch.setattr(cli, "train", bug)
    with pytest.raises(IndexError, match="a bug"):
        meta_train(str(made / "config.yaml"), made / "tasks.json", tmp_path / "a")


# --------------------------------------------------------------------------- 5. the terminal
def test_echo_shows_results_always_and_progress_at_most_every_period():
    now = [0.0]
    read, write = os.pipe()
    try:
        console = Console(write, every=30.0, clock=lambda: now[0])
        for t in (1.0, 29.0, 31.0, 40.0, 62.0):
            now[0] = t
            console.progress(f"iter at {t:g}")
        console.say("wrote the trace")
        console._echo.close()
        os.close(write)
        write = None
        with os.fdopen(read) as pipe:
            read = None
            assert pipe.read().splitlines() == ["iter at 31", "iter at 62", "wrote the trace"]
    finally:
        for fd in (read, write):
            if fd is not None:
                os.close(fd)


def test_params_name_the_changed_key():
    config = load_config(CONFIG)
    changed = load_config({**CONFIG, "metatest": {"adapt_steps": 3}})
    before, after = (part_params(stage_config(c, "meta_test", "rand", "safemeta")) for c in (config, changed))
    assert [g for g in before if before[g] != after[g]] == ["settings"]
    assert "metatest.adapt_steps=2" in before["settings"] and "metatest.adapt_steps=3" in after["settings"]


@pytest.mark.parametrize("override", [
    {"metatest": {"adapt_steps": 4}},                           # a scenario-level meta-test override
    {"rollouts": 3, "policy": {"hidden": [8]}},                 # sampling keys on an exact (tabular) run
])
def test_keys_a_stage_does_not_read_do_not_change_its_part(override):
    base = load_config(CONFIG)
    edited = copy.deepcopy(CONFIG)
    edited["scenarios"]["rand"].update(override)
    edited = load_config(edited)
    for stage in ("tasks", "meta_train"):
        assert stage_config(base, stage, "rand", "safemeta") == stage_config(edited, stage, "rand", "safemeta")
    if "metatest" in override:
        assert stage_config(base, "meta_test", "rand", "safemeta") != stage_config(edited, "meta_test", "rand", "safemeta")
