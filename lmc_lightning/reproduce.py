"""``lmc reproduce``: run a seed's headline experiment as a chain of ``lmc`` commands and check its figures.

An experiment is a YAML file ``configs/experiments/<seed>/<entry>.yaml`` (its name is ``<seed>/<entry>``)::

    title: Bezier curve vs straight line between two Fashion-MNIST MLPs
    seed: "Garipov et al. 2018 (dnn-mode-connectivity)"
    data: Fashion-MNIST (runs on a CPU in minutes)
    steps:                       # run in order; each is one `lmc <command> --config <config> <args...>`
      - id: mode                 # foreach: one step per value, ids mode0, mode1, ...; {i} is the value
        foreach: [0, 1]
        command: fit
        config: configs/endpoint/fmnist_mlp.yaml   # a file (relative to the repository root) or an inline mapping
        args: [--model.seed, "{i}"]
      - id: line
        command: test
        config: configs/interpolation/fmnist_mlp.yaml
        args: [--model.endpoints, "[{ckpt:mode0},{ckpt:mode1}]", --model.output_dir, "{dir}"]
    checks:                      # figures: an expression over the steps' statistics, a published value, a tolerance
      - name: endpoint test error (%)
        value: line.endpoint_err
        published: 6.87
        source: "Garipov et al. 2018, Table 1"
        tolerance: {abs: 1.0}    # |value - published| <= 1.0; or {max: x}: value <= x; {min: x}: value >= x

Placeholders in ``args``: ``{out}`` (the experiment's output folder), ``{dir}`` (this step's folder,
``{out}/<id>``), ``{ckpt:ID}`` (the ``last.ckpt``, else the newest ``.ckpt``, written by step ``ID``) and ``{i}``.
Every step also gets ``--trainer.default_root_dir {dir}`` and a CSV logger in ``{dir}``; extra arguments given
to ``lmc reproduce`` (after ``--``) are appended to every step. A step whose folder holds ``.done`` is skipped
(``--force`` reruns it).

Statistics of a step that wrote ``{dir}/path.json`` (a path module's ``lmc test``), in percent where accuracies:
``endpoint_acc``/``endpoint_err`` (mean over the endpoints or corners), ``best_endpoint_acc``,
``interior_max_acc`` (best point that is not an endpoint), ``acc_start``/``acc_end``, ``min_acc``,
``max_err``, ``max_acc``, ``mean_acc``, ``mid_acc``/``mid_err`` (``t = 0.5`` or ``(0.5, 0.5)``), ``max_loss``,
``mid_loss``, ``loss_barrier``, ``acc_barrier`` (points), and for surfaces ``ensemble_acc`` when evaluated. The
endpoints are the ends of the evaluated range (a connector's ``t`` runs on ``[0, end_time]``). A result with
named evaluation sets (MMC's ``clean``, ``cue``, ...; a connector's ``test`` and ``train``) also gives each set's
figures prefixed by its name, e.g. ``rand_image_acc_start``, ``clean_loss_barrier``, ``train_max_err``.

Statistics of a step's logged metrics (the newest ``metrics.csv`` of its CSV logger, any command): the last logged
value of every column, named by the metric with each character other than letters, digits and ``_`` replaced by
``_``, **as logged** (accuracies as fractions): ``test/rand_image/acc`` is ``test_rand_image_acc``,
``test/stitch/penalty`` is ``test_stitch_penalty``. Path figures take precedence over a metric of the same name.

``lmc reproduce --list`` lists the experiments; ``lmc reproduce NAME`` runs one, prints each figure beside the
published one with its source and PASS/FAIL, writes ``report.json`` and exits 0 when all checks pass, 1 when one
fails, 2 when a step fails; ``--print_config`` only validates every step's configuration.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import yaml

from lmc_lightning.io import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "configs" / "experiments"
TOLERANCE_KINDS = ("abs", "max", "min")


@dataclass
class Step:
    """One ``lmc`` command of an experiment."""

    id: str
    command: str
    config: str | dict[str, Any] | None = None
    args: list[str] = field(default_factory=list)
    i: Any = None


@dataclass
class Check:
    """One figure: ``value`` (an expression over step statistics) against ``published`` within ``tolerance``."""

    name: str
    value: str
    tolerance: dict[str, float]
    published: float | None = None
    source: str = ""

    def judge(self, measured: float) -> bool:
        """Whether ``measured`` is within the tolerance."""
        if not math.isfinite(measured):
            return False
        kind, bound = next(iter(self.tolerance.items()))
        if kind == "abs":
            return abs(measured - float(self.published)) <= bound
        return measured <= bound if kind == "max" else measured >= bound

    def describe_tolerance(self) -> str:
        """``±x``, ``<= x`` or ``>= x``."""
        kind, bound = next(iter(self.tolerance.items()))
        return {"abs": f"±{bound:g}", "max": f"<= {bound:g}", "min": f">= {bound:g}"}[kind]


@dataclass
class Experiment:
    """A seed's headline experiment: a chain of steps and the figures checked at the end."""

    name: str
    title: str
    seed: str
    data: str
    steps: list[Step]
    checks: list[Check]
    notes: str = ""

    @classmethod
    def from_yaml(cls, path: Path, name: str) -> Experiment:
        """Read and validate an experiment file (ValueError naming the problem)."""
        raw = yaml.safe_load(Path(path).read_text())
        if not isinstance(raw, dict) or "steps" not in raw or "checks" not in raw:
            raise ValueError(f"{path}: an experiment needs 'steps' and 'checks' (see lmc_lightning.reproduce).")
        steps: list[Step] = []
        for item in raw["steps"]:
            if not {"id", "command"} <= set(item):
                raise ValueError(f"{path}: every step needs an 'id' and a 'command', got {item}.")
            if item["command"] not in ("fit", "validate", "test", "predict"):
                raise ValueError(f"{path}: step '{item['id']}' has command {item['command']!r}; use fit, validate, "
                                 "test or predict.")
            values = item.get("foreach", [None])
            for value in values:
                sid = item["id"] if value is None else f"{item['id']}{value}"
                steps.append(Step(sid, item["command"], item.get("config"), [_arg(a) for a in item.get("args", [])],
                                  value))
        ids = [s.id for s in steps]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: step ids must be unique, got {ids}.")
        checks = []
        for item in raw["checks"]:
            tol = dict(item.get("tolerance") or {})
            if len(tol) != 1 or next(iter(tol)) not in TOLERANCE_KINDS:
                raise ValueError(f"{path}: check '{item.get('name')}' needs a tolerance of one of {TOLERANCE_KINDS}, "
                                 f"e.g. {{abs: 1.0}}; got {tol}.")
            if "abs" in tol and item.get("published") is None:
                raise ValueError(f"{path}: check '{item.get('name')}' has an 'abs' tolerance but no published value.")
            checks.append(Check(str(item["name"]), str(item["value"]), {k: float(v) for k, v in tol.items()},
                                item.get("published"), str(item.get("source", ""))))
        return cls(name, str(raw.get("title", name)), str(raw.get("seed", "")), str(raw.get("data", "")), steps,
                   checks, str(raw.get("notes", "")))


def _arg(value: Any) -> str:
    """A YAML value as a command-line word (``null`` and booleans as YAML writes them)."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]
    return str(value)


def list_experiments(root: Path = EXPERIMENTS) -> dict[str, Path]:
    """``{name: file}`` of every experiment under ``root`` (``<seed>/<entry>.yaml``)."""
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(Path(root).glob("*/*.yaml"))}


def load_experiment(name: str, root: Path = EXPERIMENTS) -> Experiment:
    """The experiment called ``name`` (ValueError listing the known ones when there is none)."""
    found = list_experiments(root)
    if name not in found:
        raise ValueError(f"No experiment '{name}' under {root}. Known: {', '.join(found) or 'none'} "
                         "(lmc reproduce --list).")
    return Experiment.from_yaml(found[name], name)


def find_checkpoint(folder: Path) -> Path:
    """``last.ckpt`` under ``folder`` (the newest if several), else the newest ``.ckpt``."""
    for pattern in ("last.ckpt", "*.ckpt"):
        found = sorted(Path(folder).rglob(pattern), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise FileNotFoundError(f"No checkpoint under {folder}: the step that writes it must run first and keep one "
                            "(ModelCheckpoint with save_last: true).")


def _substitute(arg: str, step: Step, out: Path, dry_run: bool) -> str:
    text = arg.replace("{out}", str(out)).replace("{dir}", str(out / step.id))
    if step.i is not None:
        text = text.replace("{i}", str(step.i))
    while "{ckpt:" in text:
        start = text.index("{ckpt:")
        end = text.index("}", start)
        ref = text[start + 6:end]
        path = out / ref / "last.ckpt" if dry_run else find_checkpoint(out / ref)
        text = text[:start] + str(path) + text[end + 1:]
    return text


def step_argv(step: Step, out: Path, extra: Sequence[str] = (), dry_run: bool = False) -> list[str]:
    """The ``lmc`` argument list of a step (inline configs are written to ``{dir}/step_config.yaml``)."""
    folder = out / step.id
    argv = [step.command]
    if isinstance(step.config, dict):
        folder.mkdir(parents=True, exist_ok=True)
        inline = atomic_write_text(folder / "step_config.yaml", yaml.safe_dump(step.config, sort_keys=False))
        argv += ["--config", str(inline)]
    elif step.config:
        path = Path(step.config)
        argv += ["--config", str(path if path.is_absolute() else REPO_ROOT / path)]
    argv += ["--trainer.default_root_dir", str(folder), "--trainer.logger.class_path",
             "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(folder)]
    argv += [_substitute(a, step, out, dry_run) for a in step.args]
    return argv + list(extra)


def path_statistics(path_json: Path) -> dict[str, float]:
    """Figures of a path/surface evaluation (``path.json``), accuracies in percent (see the module docstring)."""
    d = json.loads(Path(path_json).read_text())
    coords = np.asarray(d["coords"], dtype=float).reshape(len(d["loss"]), -1)
    stats = _curve_statistics(coords, d)
    ensemble = (d.get("meta") or {}).get("ensemble")
    if isinstance(ensemble, dict) and "accuracy" in ensemble:
        stats["ensemble_acc"] = 100 * float(ensemble["accuracy"])
    for name, part in (d.get("sets") or {}).items():
        stats.update({f"{_identifier(name)}_{k}": v for k, v in _curve_statistics(coords, part).items()})
    return stats


def _curve_statistics(coords: np.ndarray, d: dict[str, Any]) -> dict[str, float]:
    """The figures of one evaluation set: ``d`` holds ``loss``, ``accuracy`` and optionally the barriers."""
    loss = np.asarray([np.nan if v is None else v for v in d["loss"]], dtype=float)
    acc = 100 * np.asarray([np.nan if v is None else v for v in d["accuracy"]], dtype=float)
    ends = np.all(np.isclose(coords, coords.min(0)) | np.isclose(coords, coords.max(0)), axis=1)
    mid = int(np.argmin(np.abs(coords - 0.5).sum(1)))
    stats = {
        "endpoint_acc": float(acc[ends].mean()), "best_endpoint_acc": float(acc[ends].max()),
        "interior_max_acc": float(np.nanmax(acc[~ends])) if (~ends).any() else float("nan"),
        "acc_start": float(acc[0]), "acc_end": float(acc[-1]),
        "min_acc": float(np.nanmin(acc)), "max_acc": float(np.nanmax(acc)), "mean_acc": float(np.nanmean(acc)),
        "mid_acc": float(acc[mid]), "max_loss": float(np.nanmax(loss)), "mid_loss": float(loss[mid]),
        "loss_barrier": _number(d.get("loss_barrier")),
        "acc_barrier": 100 * _number(d.get("accuracy_barrier")),
    }
    stats["endpoint_err"] = 100 - stats["endpoint_acc"]
    stats["max_err"] = 100 - stats["min_acc"]
    stats["mid_err"] = 100 - stats["mid_acc"]
    return stats


def _number(value: Any) -> float:
    """``value`` as a float; ``None`` (not computed) as NaN (a barrier of 0 stays 0)."""
    return float("nan") if value is None else float(value)


def _identifier(name: str) -> str:
    """``name`` with every character other than letters, digits and ``_`` replaced by ``_``."""
    return re.sub(r"\W", "_", name, flags=re.ASCII)


def metric_statistics(folder: Path) -> dict[str, float]:
    """The last logged value of every metric in the newest ``metrics.csv`` under ``folder`` (none: ``{}``)."""
    found = sorted(Path(folder).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        return {}
    stats: dict[str, float] = {}
    with found[-1].open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key and value not in (None, "") and key not in ("epoch", "step"):
                    stats[_identifier(key)] = float(value)
    return stats


def _evaluate(expr: str, namespace: dict[str, Any]) -> float:
    try:
        return float(eval(expr, {"__builtins__": {}, "min": min, "max": max, "abs": abs}, namespace))  # noqa: S307
    except (AttributeError, NameError) as err:
        known = {k: sorted(vars(v)) for k, v in namespace.items()}
        raise ValueError(f"check value '{expr}': {err}. Statistics available: {known}.") from err


@dataclass
class Report:
    """What one reproduction measured: a row per check and whether all passed."""

    name: str
    title: str
    rows: list[dict[str, Any]]
    statistics: dict[str, dict[str, float]]

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(r["passed"] for r in self.rows)

    def table(self) -> str:
        """The figures as a plain-text table."""
        lines = [f"{self.name}: {self.title}",
                 f"{'figure':<52} {'measured':>9} {'published':>9} {'tolerance':>10}  result  source"]
        for r in self.rows:
            pub = "-" if r["published"] is None else f"{r['published']:.2f}"
            lines.append(f"{r['name'][:52]:<52} {r['measured']:>9.2f} {pub:>9} {r['tolerance']:>10}  "
                         f"{'PASS' if r['passed'] else 'FAIL':<6}  {r['source']}")
        lines.append(f"{'PASSED' if self.passed else 'FAILED'}: {sum(r['passed'] for r in self.rows)}/"
                     f"{len(self.rows)} checks")
        return "\n".join(lines)


Runner = Callable[[list[str]], Any]


def _lmc(argv: list[str]) -> Any:
    from lmc_lightning.cli import main

    return main(argv)


def run_experiment(exp: Experiment, out: Path, extra: Sequence[str] = (), force: bool = False,
                   runner: Runner = _lmc, log: Callable[[str], None] = print) -> Report:
    """Run the steps (skipping finished ones unless ``force``), then compute and judge the checks."""
    out = Path(out)
    stats: dict[str, dict[str, float]] = {}
    for step in exp.steps:
        folder = out / step.id
        done = folder / ".done"
        if done.exists() and not force:
            log(f"[{exp.name}] {step.id}: done before, skipped (--force reruns it)")
        else:
            argv = step_argv(step, out, extra)
            log(f"[{exp.name}] {step.id}: lmc {shlex.join(argv)}")
            runner(argv)
            atomic_write_text(done, "")
        found = metric_statistics(folder)
        if (folder / "path.json").exists():
            found.update(path_statistics(folder / "path.json"))
        if found:
            stats[step.id] = found
    namespace = {sid: SimpleNamespace(**s) for sid, s in stats.items()}
    rows = []
    for check in exp.checks:
        measured = _evaluate(check.value, namespace)
        rows.append({"name": check.name, "value": check.value, "measured": measured, "published": check.published,
                     "tolerance": check.describe_tolerance(), "source": check.source,
                     "passed": check.judge(measured)})
    report = Report(exp.name, exp.title, rows, stats)
    atomic_write_text(out / "report.json", json.dumps(asdict(report), indent=2, default=float) + "\n")
    return report


def print_configs(exp: Experiment, out: Path, extra: Sequence[str] = (), runner: Runner = _lmc) -> None:
    """Validate every step's configuration: each distinct (command, config) runs as ``--print_config``.

    Nothing is trained; steps that differ only in their arguments are parsed once (with the first one's).
    """
    seen = set()
    for step in exp.steps:
        argv = step_argv(step, out, extra, dry_run=True)
        key = (step.command, json.dumps(step.config, sort_keys=True, default=str))
        if key in seen:
            continue
        seen.add(key)
        try:
            runner([*argv, "--print_config"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise ValueError(f"{exp.name}: step '{step.id}' has an invalid configuration "
                                 f"(lmc {shlex.join(argv)}).") from stop


def main(argv: Sequence[str] | None = None) -> int:
    """``lmc reproduce NAME [--out DIR] [--force] [--print_config] [-- extra lmc args]`` / ``--list``."""
    argv = list(sys.argv[2:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="lmc reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="experiment name, <seed>/<entry> (see --list)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--out", default=None, help="output folder (default runs/reproduce/<name>)")
    parser.add_argument("--root", default=str(EXPERIMENTS), help="folder of the experiments")
    parser.add_argument("--force", action="store_true", help="rerun steps that finished before")
    parser.add_argument("--print_config", action="store_true", help="only validate every step's configuration")
    opts = parser.parse_args(argv)
    root = Path(opts.root)
    if opts.list:
        for name, path in list_experiments(root).items():
            exp = Experiment.from_yaml(path, name)
            print(f"{name:<44} {exp.data:<40} {exp.title}")
        return 0
    if not opts.name:
        parser.error("give an experiment name (lmc reproduce --list shows them)")
    try:
        exp = load_experiment(opts.name, root)
    except ValueError as err:
        print(f"lmc reproduce: {err}", file=sys.stderr)
        return 2
    out = Path(opts.out or Path("runs") / "reproduce" / opts.name)
    if opts.print_config:
        print_configs(exp, out, extra)
        print(f"{exp.name}: all {len(exp.steps)} step configurations parse.")
        return 0
    try:
        report = run_experiment(exp, out, extra, force=opts.force)
    except Exception as err:  # a failing step: say which, keep the traceback's last line
        print(f"lmc reproduce {exp.name}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"report: {out / 'report.json'}")
    return 0 if report.passed else 1
