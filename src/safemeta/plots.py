"""The paper's figure kinds, drawn from summary.nc (`results.aggregate_traces`).

- `metatrain.png` (Fig. 1 columns 1-2): per scenario (columns), against the meta-iteration, the
  mean reward over the evaluation tasks (top) and the maximal cost over them (bottom) of the
  policy adapted one step from the meta-policy.
- `metatest.png` (Fig. 1 columns 3-4): the same two quantities against the adaptation step k
  of the meta-test (k = 0 is the meta-policy): anytime safety is the bottom row staying below
  the dashed limit at every k.
- `compute_time.png` (Fig. 2): computation time per meta-iteration and per meta-test
  adaptation step, per scenario and method, normalised by the slowest method of the scenario.
- `single_task.png`: per scenario with single-task learners (columns), the mean reward (top) and
  mean cost (bottom) over the tasks the learners trained on, against the environment steps
  taken so far: each learner's training curve, and each method's meta-test curve on the same
  tasks at its own sample counts (k = 0, 1, ... adaptation steps).
- `comparison.png` (Fig. 1/4 layout, `comparison_figure`; drawn by `safemeta compare`): one row
  per scenario, the four columns of the paper's figure side by side for every method.

Curves show the mean over seeds with a band of one standard deviation. The cost axis is the
cost itself with the limit d dashed when a scenario has one constraint with the same d for
every task; otherwise (per-task limits, as the tabular scenarios draw) it is cost - d, dashed at 0.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from .atomic import atomic_path  # noqa: E402

FIGURES = ("metatrain", "metatest", "compute_time", "single_task")


def _colors(methods: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}


def worst_cost(cost: xr.DataArray, limit: xr.DataArray) -> tuple[xr.DataArray, float, str]:
    """Max over tasks (and constraints) of the cost, the dashed line's height and the axis label.

    `cost` and `limit` belong to one scenario; `limit` has dims (seed, task, constraint).
    """
    finite = limit.values[np.isfinite(limit.values)]
    n_constraints = int(limit.notnull().any(("seed", "task")).sum())
    if n_constraints == 1 and finite.size and finite.min() == finite.max():
        return cost.max(("task", "constraint")), float(finite[0]), "max cost over tasks"
    return (cost - limit).max(("task", "constraint")), 0.0, "max (cost - d) over tasks"


def _band(ax, x: xr.DataArray, label: str, color: str) -> None:
    """Mean over seeds with a one-standard-deviation band; padded (NaN) entries left out."""
    mean, std = x.mean("seed"), x.std("seed")
    keep = mean.notnull().values
    if not keep.any():
        return
    xs = mean[mean.dims[0]].values[keep]
    ax.plot(xs, mean.values[keep], color=color, label=label)
    ax.fill_between(xs, (mean - std).values[keep], (mean + std).values[keep], color=color, alpha=0.25, lw=0)


def _message(title: str, text: str) -> plt.Figure:
    """A figure that only says why it has nothing to show."""
    fig, ax = plt.subplots(figsize=(6, 2.5), constrained_layout=True)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    fig.suptitle(title)
    return fig


def _curves(summary: xr.Dataset, prefix: str, xdim: str, xlabel: str, title: str) -> plt.Figure:
    if f"{prefix}reward" not in summary:
        return _message(title, "no method ran (`methods:` in the config is empty)")
    scenarios, methods = list(summary.scenario.values), list(summary.method_name.values)
    colors = _colors(methods)
    fig, axes = plt.subplots(2, len(scenarios), figsize=(4.2 * len(scenarios), 6.4), squeeze=False,
                             constrained_layout=True)
    for col, scenario in enumerate(scenarios):
        one = summary.sel(scenario=scenario)
        cost, line, cost_label = worst_cost(one[f"{prefix}cost"], one["limit"])
        for method in methods:
            _band(axes[0, col], one[f"{prefix}reward"].sel(method_name=method).mean("task"), method, colors[method])
            _band(axes[1, col], cost.sel(method_name=method), method, colors[method])
        axes[1, col].axhline(line, color="black", ls="--", lw=1, label="limit d")
        axes[0, col].set_title(scenario)
        axes[0, col].set_ylabel("mean reward over tasks")
        axes[1, col].set_ylabel(cost_label)
        axes[1, col].set_xlabel(xlabel)
    axes[1, 0].legend(loc="best", fontsize="small")
    fig.suptitle(title)
    return fig


def metatrain_figure(summary: xr.Dataset) -> plt.Figure:
    return _curves(summary, "metatrain_", "iteration", "meta-iteration",
                   "Meta-training: policy adapted one step from the meta-policy")


def metatest_figure(summary: xr.Dataset) -> plt.Figure:
    return _curves(summary, "metatest_", "step", "adaptation step k (0 = meta-policy)",
                   "Meta-test: anytime safety of the adaptation sequence")


def has_metatraining(summary: xr.Dataset) -> xr.DataArray:
    """(scenario, method_name): the method's meta-training trace evaluates its meta-policy.

    Meta-CRPO, run as the paper runs it, has no meta-training stage to show (its records hold its
    CRPO runs on the training tasks, not meta-iterations), like the paper's Figs. 1-2 and 4-5.
    """
    return summary["metatrain_reward"].notnull().any([d for d in summary["metatrain_reward"].dims
                                                      if d not in ("scenario", "method_name")])


def compute_times(summary: xr.Dataset) -> dict[str, xr.DataArray]:
    """Seconds of computation per meta-iteration and per meta-test step, dims (scenario, method_name, seed).

    Medians over iterations (resp. tasks and steps k >= 1), so one-off warm-up costs do not count;
    meta-iterations only for methods with a meta-training stage (`has_metatraining`).
    """
    out = {}
    if "metatrain_time_compute" in summary:
        seconds = summary["metatrain_time_compute"].median("iteration")
        if "metatrain_reward" in summary:   # a method without a meta-training curve (Meta-CRPO) has no bar
            seconds = seconds.where(has_metatraining(summary))
        out["meta-training (per iteration)"] = seconds
    if "metatest_time" in summary:
        steps = summary["metatest_time"].isel(step=slice(1, None))  # k = 0 runs no adaptation
        out["meta-test (per adaptation step)"] = steps.median(("task", "step"))
    return out


def compute_time_figure(summary: xr.Dataset) -> plt.Figure:
    if "method_name" not in summary.dims:
        return _message("Normalised computation time", "no method ran (`methods:` in the config is empty)")
    scenarios, methods = list(summary.scenario.values), list(summary.method_name.values)
    colors = _colors(methods)
    panels = compute_times(summary)
    n_panels = max(len(panels), 1)
    panel_width = max(5.0, 1.2 * len(scenarios) * len(methods) + 2.0)
    fig, axes = plt.subplots(1, n_panels, figsize=(panel_width * n_panels, 4.2), squeeze=False,
                             constrained_layout=True)
    width = 0.8 / len(methods)
    for ax, (name, seconds) in zip(axes[0], panels.items()):
        mean, std = seconds.mean("seed"), seconds.std("seed")
        slowest = mean.max("method_name")
        for i, method in enumerate(methods):
            xs = np.arange(len(scenarios)) + (i - (len(methods) - 1) / 2) * width
            height = (mean / slowest).sel(method_name=method).values
            bars = ax.bar(xs, height, width, yerr=(std / slowest).sel(method_name=method).values, capsize=3,
                          color=colors[method], label=method)
            for bar, sec in zip(bars, mean.sel(method_name=method).values):
                if np.isfinite(sec):
                    ax.annotate(f"{sec:.3g} s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize="x-small")
        ax.set_xticks(np.arange(len(scenarios)), scenarios)
        ax.set_ylabel("computation time / slowest method")
        ax.set_title(name)
        top = float(((mean + std) / slowest).max())
        ax.set_ylim(0, 1.15 * max(top, 1.0) if np.isfinite(top) else 1.25)
        ax.legend(loc="upper right", fontsize="small")
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no timing variables in summary.nc", ha="center", transform=axes[0, 0].transAxes)
    fig.suptitle("Normalised computation time (median per seed; mean and std over seeds)")
    return fig


def sample_curves(summary: xr.Dataset, scenario: str) -> dict[str, dict[str, xr.DataArray]]:
    """Curves of `single_task.png` for one scenario: label -> {"env_steps", "reward", "cost"}.

    Labels are the learners that ran on the scenario and the methods meta-tested on it. Every
    curve is over the tasks the learners trained on (per seed: the tasks with single-task data),
    dims (seed, x) with x the learner's `single_step` or the meta-test `step`: env_steps the
    environment steps taken up to and including the policy at x (mean over those tasks), reward
    the mean over them, cost the mean over them of cost (one constraint with one d for every task)
    or of cost - d (otherwise; `cost_axis` says which).
    """
    one = summary.sel(scenario=scenario)
    trained = one["single_reward"].notnull().any(("learner", "single_step"))          # (seed, task)
    relative = not cost_axis(one["limit"])[0]
    curves: dict[str, dict[str, xr.DataArray]] = {}

    def add(name: str, reward: xr.DataArray, cost: xr.DataArray, env_steps: xr.DataArray, step: str) -> None:
        if not reward.where(trained).notnull().any():
            return
        cost = (cost - one["limit"]) if relative else cost
        curves[name] = {"env_steps": env_steps.cumsum(step).where(trained).mean("task"),
                        "reward": reward.where(trained).mean("task"),
                        "cost": cost.max("constraint").where(trained).mean("task")}

    for learner in summary.learner.values:
        sel = one.sel(learner=learner)
        add(str(learner), sel["single_reward"], sel["single_cost"], sel["single_env_steps"], "single_step")
    if "metatest_reward" in summary and "method_name" in summary.dims:
        for method in summary.method_name.values:
            sel = one.sel(method_name=method)
            add(f"{method} (meta-test)", sel["metatest_reward"], sel["metatest_cost"], sel["metatest_env_steps"], "step")
    return curves


def cost_axis(limit: xr.DataArray) -> tuple[bool, float, str]:
    """Whether the cost row can show cost itself (one constraint, one d), the dashed line, the label."""
    finite = limit.values[np.isfinite(limit.values)]
    n_constraints = int(limit.notnull().any(("seed", "task")).sum())
    if n_constraints == 1 and finite.size and finite.min() == finite.max():
        return True, float(finite[0]), "mean cost over tasks"
    return False, 0.0, "mean (cost - d) over tasks"


def single_task_figure(summary: xr.Dataset) -> plt.Figure:
    has_learners = "single_reward" in summary and bool(summary["single_reward"].notnull().any())
    scenarios = [str(s) for s in summary.scenario.values
                 if has_learners and bool(summary["single_reward"].sel(scenario=s).notnull().any())]
    if not scenarios:
        return _message("Single-task learners against meta-test adaptation",
                        "no single-task learner ran\n(set `learners:` in the config)")
    fig, axes = plt.subplots(2, len(scenarios), figsize=(4.6 * len(scenarios), 6.4), squeeze=False,
                             constrained_layout=True)
    labels = sorted({label for s in scenarios for label in sample_curves(summary, s)})
    colors = _colors(labels)
    for col, scenario in enumerate(scenarios):
        curves = sample_curves(summary, scenario)
        _, line, cost_label = cost_axis(summary.sel(scenario=scenario)["limit"])
        for label, curve in curves.items():
            style = dict(marker="o", ms=3) if label.endswith("(meta-test)") else {}
            x = curve["env_steps"].mean("seed")
            for row, key in enumerate(("reward", "cost")):
                mean, std = curve[key].mean("seed"), curve[key].std("seed")
                keep = (mean.notnull() & x.notnull()).values
                axes[row, col].plot(x.values[keep], mean.values[keep], color=colors[label], label=label, **style)
                axes[row, col].fill_between(x.values[keep], (mean - std).values[keep], (mean + std).values[keep],
                                            color=colors[label], alpha=0.2, lw=0)
        axes[1, col].axhline(line, color="black", ls="--", lw=1, label="limit d")
        axes[0, col].set_title(scenario)
        axes[0, col].set_ylabel("mean reward over tasks")
        axes[1, col].set_ylabel(cost_label)
        axes[1, col].set_xlabel("environment steps (log scale)")
        for row in range(2):
            axes[row, col].set_xscale("log")
            axes[row, col].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1, 0].legend(loc="best", fontsize="small")
    fig.suptitle("Learners from scratch vs.\nmeta-test adaptation")
    return fig


COMPARISON_COLUMNS = (("metatrain_", "reward", "meta-training: reward (one-step adapted)", "meta-iteration"),
                      ("metatrain_", "cost", "meta-training: max cost (one-step adapted)", "meta-iteration"),
                      ("metatest_", "reward", "meta-test: reward", "adaptation step k (0 = meta-policy)"),
                      ("metatest_", "cost", "meta-test: max cost", "adaptation step k (0 = meta-policy)"))


def comparison_figure(summary: xr.Dataset) -> plt.Figure:
    """The paper's Fig. 1/4 layout: one row per scenario; columns: meta-training reward and maximal
    cost of the one-step adapted policy against the meta-iteration, meta-test reward and maximal
    cost against the adaptation step. Mean over seeds and a one-standard-deviation band, one
    colour per method, d dashed; a method without a meta-training curve (Meta-CRPO) is absent
    from the first two columns."""
    scenarios, methods = list(summary.scenario.values), list(summary.method_name.values)
    colors = _colors(methods)
    fig, axes = plt.subplots(len(scenarios), 4, figsize=(16, 3.1 * len(scenarios) + 0.6), squeeze=False,
                             constrained_layout=True)
    for row, scenario in enumerate(scenarios):
        one = summary.sel(scenario=scenario)
        for col, (prefix, quantity, title, xlabel) in enumerate(COMPARISON_COLUMNS):
            ax = axes[row, col]
            name = f"{prefix}{quantity}"
            if name not in one:
                ax.set_axis_off()
                continue
            if quantity == "cost":
                values, line, label = worst_cost(one[name], one["limit"])
                ax.axhline(line, color="black", ls="--", lw=1, label="limit d")
            else:
                values, label = one[name].mean("task"), "mean reward over tasks"
            for method in methods:
                _band(ax, values.sel(method_name=method), method, colors[method])
            ax.set_title(f"{scenario}: {title}" if col == 0 else title, fontsize="medium")
            ax.set_ylabel(label)
            ax.set_xlabel(xlabel)
    handles = [plt.Line2D([], [], color=colors[m], label=m) for m in methods]
    handles.append(plt.Line2D([], [], color="black", ls="--", label="limit d"))
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize="small")
    return fig


def write_comparison_figure(summary: xr.Dataset, path: str | Path) -> Path:
    fig = comparison_figure(summary)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def write_figures(summary: xr.Dataset, out_dir: str | Path) -> list[Path]:
    """Draw every figure of FIGURES into `out_dir/<name>.png` (atomically); return the paths."""
    makers = {"metatrain": metatrain_figure, "metatest": metatest_figure, "compute_time": compute_time_figure,
              "single_task": single_task_figure}
    paths = []
    for name in FIGURES:
        fig = makers[name](summary)
        path = Path(out_dir) / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
