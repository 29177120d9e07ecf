"""The ``lmc`` command: LightningCLI over every lmc_lightning module and datamodule."""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported for their side effect: subclasses become selectable by short name (--model InterpolationModule).
import lmc_lightning.callbacks  # noqa: F401
import lmc_lightning.modules  # noqa: F401
from lmc_lightning.data import BaseDataModule
from lmc_lightning.modules.base import LMCModule

DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}


def _check_logger(logger: Any) -> None:
    """Fail early, with the fix, when the wandb logger is chosen but wandb is not installed."""
    loggers = logger if isinstance(logger, list) else [logger]
    for item in loggers:
        path = str(item.get("class_path", "") if hasattr(item, "get") else item)
        if "Wandb" in path and importlib.util.find_spec("wandb") is None:
            raise SystemExit("WandbLogger was selected but wandb is not installed: "
                             "pip install 'lmc_lightning[wandb]' (or choose CSVLogger/TensorBoardLogger).")


class LMCLightningCLI(LightningCLI):
    """LightningCLI with the datamodule's ``num_classes``/``input_shape`` linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link data properties to model arguments."""
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Validate the logger choice before anything heavy is built."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer", {}) or {}
        logger = trainer.get("logger")
        if logger not in (None, True, False):
            _check_logger(logger)


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
    return LMCLightningCLI(
        LMCModule,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        trainer_defaults={"logger": DEFAULT_LOGGER},
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
