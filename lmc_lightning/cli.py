"""The ``lmc`` command: LightningCLI over every lmc_lightning module and datamodule."""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported for their side effect: subclasses become selectable by short name (--model InterpolationModule).
import lmc_lightning.callbacks  # noqa: F401
import lmc_lightning.modules  # noqa: F401
from lmc_lightning.data import BaseDataModule
from lmc_lightning.modules.base import LMCModule
from lmc_lightning.nets import available

DEFAULT_ROOT_DIR = "runs"
DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": DEFAULT_ROOT_DIR}}
LIGHTNING_RUN_NAME = "lightning_logs"


def _check_logger(logger: Any) -> None:
    """Fail early, with the fix, when the wandb logger is chosen but wandb is not installed."""
    loggers = logger if isinstance(logger, list) else [logger]
    for item in loggers:
        path = str(item.get("class_path", "") if hasattr(item, "get") else item)
        if "Wandb" in path and importlib.util.find_spec("wandb") is None:
            raise SystemExit("WandbLogger was selected but wandb is not installed: "
                             "pip install 'lmc_lightning[wandb]' (or choose CSVLogger/TensorBoardLogger).")


def place_logs(config: Any) -> None:
    """Put the logger's folder where the trainer's outputs go, and name runs after the module.

    A logger whose ``save_dir`` was left at the default follows ``trainer.default_root_dir``; a run ``name`` left at
    Lightning's ``lightning_logs`` becomes the module's class name. So ``lmc fit --config ... --trainer.default_root_dir
    out`` writes ``out/EndpointModule/version_N/`` (metrics, ``config.yaml``, ``checkpoints/``), and result files of
    path modules land in the same folder.
    """
    trainer = config.get("trainer") or {}
    root = trainer.get("default_root_dir") or DEFAULT_ROOT_DIR
    model = config.get("model")
    module = str(model.get("class_path", "")).rsplit(".", 1)[-1] if hasattr(model, "get") else ""
    logger = trainer.get("logger")
    for item in logger if isinstance(logger, list) else [logger]:
        init = item.get("init_args") if hasattr(item, "get") else None
        if init is None:
            continue
        if init.get("save_dir") == DEFAULT_ROOT_DIR:
            init["save_dir"] = root
        if init.get("name") == LIGHTNING_RUN_NAME and module:
            init["name"] = module


def resume_in_place(config: Any) -> Path | None:
    """Point the logger of a resumed ``fit`` at the run folder its checkpoint came from.

    For ``--ckpt_path <save_dir>/<name>/<version>/checkpoints/x.ckpt`` and a CSV or TensorBoard logger whose
    ``version`` was not given, the resumed run logs into ``<save_dir>/<name>/<version>`` (not a new version
    folder). CSVLogger rewrites ``metrics.csv`` of an existing folder, so the earlier rows are kept first as
    ``metrics_before_step<N>.csv``.

    Returns:
        The run folder resumed into, or None.
    """
    ckpt = config.get("ckpt_path")
    logger = (config.get("trainer") or {}).get("logger")
    if not ckpt or not os.path.isfile(ckpt) or not hasattr(logger, "get"):
        return None
    ckpt = Path(ckpt).resolve()
    init = logger.get("init_args")
    kind = str(logger.get("class_path", "")).rsplit(".", 1)[-1]
    if ckpt.parent.name != "checkpoints" or init is None or init.get("version") is not None or kind not in (
            "CSVLogger", "TensorBoardLogger"):
        return None
    run_dir = ckpt.parent.parent
    init["save_dir"], init["name"], init["version"] = str(run_dir.parent.parent), run_dir.parent.name, run_dir.name
    metrics = run_dir / "metrics.csv"
    if kind == "CSVLogger" and metrics.is_file():
        step = torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", 0)
        metrics.rename(run_dir / f"metrics_before_step{step}.csv")
    return run_dir


def check_ckpt_path(ckpt_path: str | os.PathLike | None, model_class_path: str | None) -> None:
    """Fail early and clearly on a ``--ckpt_path`` that does not exist or was written by another module.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Its hyperparameters name another module class than the one selected with ``--model``.
    """
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
        return
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist: pass the path of a checkpoint written by "
                                "`lmc fit` (e.g. <run folder>/checkpoints/last.ckpt).")
    if not model_class_path:
        return
    hparams = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    writer = hparams.get("_class_path")
    if writer and writer.rsplit(".", 1)[-1] != str(model_class_path).rsplit(".", 1)[-1]:
        raise ValueError(f"--ckpt_path {ckpt_path} was written by {writer.rsplit('.', 1)[-1]}, but the config selects "
                         f"{str(model_class_path).rsplit('.', 1)[-1]}: pass a checkpoint of that module, or drop "
                         "--config/--model to run the checkpoint's own module.")


PROGRESS_REFRESH_RATE = 10
"""Batches between refreshes of the default progress bar (Lightning's default, 1, redraws the bar and reads every
progress-bar metric after each batch: about 0.2 ms a step, as much as the rest of Lightning's loop for a small net;
tqdm itself shows at most 10 updates a second)."""


class LMCLightningCLI(LightningCLI):
    """LightningCLI with the datamodule's ``num_classes``/``input_shape`` linked into the model, outputs placed by
    :func:`place_logs`, and the default progress bar refreshed every :data:`PROGRESS_REFRESH_RATE` batches (a
    ``TQDMProgressBar`` given in ``trainer.callbacks`` keeps its own ``refresh_rate``)."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with the refresh rate of its default progress bar set."""
        given = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        given = {id(c) for c in (given if isinstance(given, list) else [given])}  # before Lightning adds its own
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar and bar.refresh_rate == 1 and id(bar) not in given:
            bar._refresh_rate = PROGRESS_REFRESH_RATE
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link data properties to model arguments."""
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (:func:`check_ckpt_path`) before Lightning reads its hyperparameters."""
        if self.config.get("subcommand"):
            config = self.config[self.config.subcommand]
            model = config.get("model")
            check_ckpt_path(config.get("ckpt_path"), model.get("class_path") if hasattr(model, "get") else None)
        super()._parse_ckpt_path()

    def _expect_checkpoint(self) -> None:
        """A path module restored from ``--ckpt_path`` takes its endpoints from the checkpoint, not from files."""
        if self.config_init[self.subcommand].get("ckpt_path") and hasattr(self.model, "restore_pending"):
            self.model.restore_pending = True

    def before_fit(self) -> None:
        self._expect_checkpoint()

    def before_validate(self) -> None:
        self._expect_checkpoint()

    def before_test(self) -> None:
        self._expect_checkpoint()

    def before_predict(self) -> None:
        self._expect_checkpoint()

    def before_instantiate_classes(self) -> None:
        """Validate the logger choice before anything heavy is built."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer", {}) or {}
        logger = trainer.get("logger")
        if logger not in (None, True, False):
            _check_logger(logger)
            place_logs(config)
            if self.subcommand == "fit":
                resume_in_place(config)


NETS_NOTE = " Registered nets: "


def _subclasses(cls: type) -> list[type]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]


def document_nets() -> None:
    """Append the registered net names to the ``net`` argument of every module's docstring, which is what
    ``lmc fit --model.help EndpointModule`` prints (refreshed on every call, so nets registered later appear)."""
    names = ", ".join(available())
    for cls in _subclasses(LMCModule):
        doc = cls.__dict__.get("__doc__") or ""
        lines = doc.split("\n")
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("net: ")), None)
        if start is None:
            continue
        indent = len(lines[start]) - len(lines[start].lstrip())
        end = start
        while end + 1 < len(lines) and len(lines[end + 1]) - len(lines[end + 1].lstrip()) > indent:
            end += 1
        if NETS_NOTE in lines[end]:
            lines[end] = lines[end].split(NETS_NOTE)[0]
        lines[end] += f"{NETS_NOTE}{names}."
        cls.__doc__ = "\n".join(lines)


def main(args: list[str] | None = None) -> LightningCLI | int:
    """Run ``lmc fit|validate|test|predict`` and return the CLI (its ``trainer``, ``model``, ``datamodule``).

    ``args`` replaces ``sys.argv[1:]`` (used by tests and notebooks). Errors propagate as exceptions; the ``lmc``
    console script is :func:`run`, which turns them into a message and an exit code. ``lmc reproduce ...`` goes to
    :func:`lmc_lightning.reproduce.main` and returns its exit status (an int).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["reproduce"]:
        from lmc_lightning.reproduce import main as reproduce

        return reproduce(argv[1:])
    document_nets()
    return LMCLightningCLI(
        LMCModule,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        trainer_defaults={"logger": DEFAULT_LOGGER, "default_root_dir": DEFAULT_ROOT_DIR},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "LMC_TRACEBACK"


def run(args: list[str] | None = None) -> int:
    """The ``lmc`` console script (and ``python -m lmc_lightning``): :func:`main`, with an exit code.

    Returns 0 after a successful run. An error prints ``lmc: error: <type>: <message>`` to stderr first and returns
    1; the traceback follows only when asked for (``--traceback`` anywhere in the arguments, or ``LMC_TRACEBACK=1``).
    Argument errors exit with the parser's message and code 2, as before. ``lmc reproduce`` returns its own status
    (1 when a figure misses its tolerance).
    """
    argv = list(sys.argv[1:] if args is None else args)
    show_traceback = TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != TRACEBACK_FLAG]
    try:
        result = main(argv)
    except KeyboardInterrupt:
        print("lmc: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (every failure becomes a message and exit code 1)
        message = str(err).strip() or repr(err)
        print(f"lmc: error: {type(err).__name__}: {message}", file=sys.stderr)
        if show_traceback:
            traceback.print_exception(err, file=sys.stderr)
        else:
            print(f"(pass {TRACEBACK_FLAG} or set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
