# %% [markdown]
# # Mechanistic mode connectivity (MMC, seed 000) on Fashion-MNIST with the box cue
# Per seed: train a cue model (80% of each class carries its label's box) and a no-cue model (clean data)
# (``configs/mmc/fmnist_box_cue.yaml``), fine-tune the cue model with FT, LP, LP-FT and CBFT
# (``configs/mmc/fmnist_finetune.yaml``) and report test accuracy on the four counterfactual sets (clean, cue,
# rand_cue, rand_image); evaluate the linear path from the no-cue model (t=0) to the cue model (t=1) on the four sets
# (``configs/mmc/fmnist_lmc.yaml``). Writes ``results.json``, ``table.md`` and ``lmc_seed<k>.png`` into ``LMC_OUT``.
#
# Environment: ``LMC_SEEDS`` (default ``0,1,2``; ``0`` with ``LMC_SUBSET``), ``LMC_EPOCHS`` (endpoint epochs,
# default 2; fine-tuning runs the config's 20 unless it is smaller), ``LMC_SUBSET`` (training samples of the endpoints;
# default all), ``LMC_OUT``. As a script: ``OMP_NUM_THREADS=1 python examples/03_mmc_finetune.py``.

# %%
# %matplotlib inline
import json
import os
from pathlib import Path

import numpy as np

from lmc_lightning.cli import main
from lmc_lightning.plots import plot_bars, plot_result

SUBSET = os.environ.get("LMC_SUBSET")
SEEDS = [int(s) for s in os.environ.get("LMC_SEEDS", "0" if SUBSET else "0,1,2").split(",")]
EPOCHS = int(os.environ.get("LMC_EPOCHS", "2"))
OUT = Path(os.environ.get("LMC_OUT", "runs/mmc_example"))
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mmc"
METHODS = ("ft", "lp", "lpft", "cbft")
SETS = ("clean", "cue", "rand_cue", "rand_image")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# %% The steps: endpoints, fine-tuning, the linear path (each one `lmc` command).
def base_args(batch_size: int = 256, val: int = 5000) -> str:
    args = {"root": "data", "batch_size": batch_size, "val_split": val}
    if SUBSET:
        args["train_subset"] = int(SUBSET)
        args["val_split"] = min(val, int(SUBSET) // 4)
    return json.dumps(args)


def logger(name: str) -> list[str]:
    return ["--trainer.default_root_dir", str(OUT), "--trainer.logger.init_args.save_dir", str(OUT),
            "--trainer.logger.init_args.name", name]


def last_ckpt(name: str) -> Path:
    return sorted((OUT / name).rglob("last.ckpt"))[-1]


def endpoint(seed: int, proportion: float) -> Path:
    name = f"{'cue' if proportion else 'nocue'}_seed{seed}"
    main(["fit", "--config", str(CONFIGS / "fmnist_box_cue.yaml"), "--seed_everything", str(seed),
          "--model.init_args.seed", str(seed), "--data.init_args.base_args", base_args(),
          "--data.init_args.cue_proportion", str(proportion), "--trainer.max_epochs", str(EPOCHS),
          *logger(name), *QUIET])
    return last_ckpt(name)


def finetune(seed: int, cue: Path, method: str | None) -> dict[str, float]:
    """Test accuracies on the four sets after fine-tuning (``method`` None: of the cue model itself)."""
    name = f"{method or 'none'}_seed{seed}"
    common = ["--config", str(CONFIGS / "fmnist_finetune.yaml"), "--seed_everything", str(seed),
              "--model.init_args.init", str(cue), "--model.init_args.seed", str(seed),
              "--data.init_args.base_args", base_args(), *logger(name), *QUIET]
    if SUBSET:
        common += ["--model.init_args.n_clean", str(min(2500, int(SUBSET) // 2)),
                   "--model.init_args.n_cue", str(int(SUBSET)), "--model.init_args.lp_epochs", "5"]
    ckpt = []
    if method is not None:
        epochs = min(20, max(EPOCHS, 2)) if SUBSET else 20
        main(["fit", *common, "--model.init_args.method", method, "--trainer.max_epochs", str(epochs),
              "--trainer.limit_val_batches", "0"])  # the sets are evaluated once, by `lmc test`
        ckpt = ["--ckpt_path", str(last_ckpt(name))]
    cli = main(["test", *common, *ckpt])
    return {s: float(cli.trainer.callback_metrics[f"test/{s}/acc"]) for s in SETS}


LMC_RESULTS: dict = {}


def lmc(seed: int, nocue: Path, cue: Path) -> dict:
    name = f"lmc_seed{seed}"
    cli = main(["test", "--config", str(CONFIGS / "fmnist_lmc.yaml"), "--model.init_args.endpoints",
                f"[{nocue},{cue}]", "--data.init_args.base_args", base_args(val=0), *logger(name), *QUIET])
    result = cli.model.result
    result.plot(OUT / f"lmc_seed{seed}.png", title=f"no-cue (t=0) to cue (t=1) model, seed {seed}")
    LMC_RESULTS[seed] = result
    return {s: {"accuracy": part.accuracy.tolist(), **part.barriers()} for s, part in result.sets.items()}


def table(results: dict) -> str:
    lines = ["| model | " + " | ".join(SETS) + " |", "|---" * (len(SETS) + 1) + "|"]
    for method in ("cue model", *METHODS):
        accs = np.array([[results[str(s)]["finetune"][method][k] for k in SETS] for s in SEEDS]) * 100
        cells = [f"{m:.1f} ± {d:.1f}" for m, d in zip(accs.mean(0), accs.std(0), strict=True)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# %% Run every seed (results.json is rewritten after each).
OUT.mkdir(parents=True, exist_ok=True)
results = {}
for seed in SEEDS:
    cue, nocue = endpoint(seed, 0.8), endpoint(seed, 0.0)
    tuned = {"cue model": finetune(seed, cue, None)}
    tuned.update({m: finetune(seed, cue, m) for m in METHODS})
    results[str(seed)] = {"finetune": tuned, "lmc": lmc(seed, nocue, cue)}
    (OUT / "results.json").write_text(json.dumps(results, indent=2))

# %% Test accuracy (%) per counterfactual set, mean ± std over the seeds.
text = table(results)
(OUT / "table.md").write_text(text)
print(text)
mean = {s: [100 * np.mean([results[str(k)]["finetune"][m][s] for k in SEEDS]) for m in ("cue model", *METHODS)]
        for s in SETS}
plot_bars(mean, ["cue model", *METHODS], "test accuracy (%)", "accuracy per counterfactual set after fine-tuning")

# %% The linear path from the no-cue model (t=0) to the cue model (t=1), per set (the first seed).
plot_result(LMC_RESULTS[SEEDS[0]], title=f"no-cue (t=0) to cue (t=1) model, seed {SEEDS[0]}")
