"""Per-model training recipes: the optimizer settings a built-in model gets unless the user sets them.

The six optimizer knobs of a ``JobConfig`` (``optimizer``, ``lr``, ``momentum``, ``weight_decay``,
``lr_schedule``, ``warmup_steps``) default to ``None``, meaning "the model's recipe". ``resolve``
fills each ``None`` from the recipe of ``job.model`` (and ``job.model_size``); a value the user set
(a flag, or a field of a ``JobConfig`` built in code) is kept as it is. The master resolves once it
knows how many steps the run takes (warmup is a share of them) and sends the resolved job to every
worker; ``config.json`` holds it, with where each value came from.

Why each recipe (also in the README's model table):

* ``simple_cnn`` — small, no BatchNorm: momentum SGD at 0.05 with a cosine decay reaches 99.4 % on
  ``digits`` in one epoch; warmup buys nothing.
* ``resnet50`` — Goyal et al. 2017 ("ImageNet in 1 hour"): momentum 0.9, lr 0.1 × B/256 (linear
  scaling with the global batch B), weight decay 1e-4, a linear warmup over the first 5 % of the
  steps, then cosine. Without the warmup lr 0.05 diverged by step 4 on ``synthetic_image``.
* ``bert`` / ``gpt2`` — transformers trained from scratch need Adam with warmup (Devlin et al. 2019;
  Radford et al. 2019): momentum SGD at 0.05 left BERT at chance (loss ln 2) and GPT-2 near the
  uniform loss. AdamW, 10 % warmup, cosine; lr 1e-3 (BERT) and 3e-3 (GPT-2) for the ``tiny``
  sizes (GPT-2 tiny at 1e-3 ended 2 epochs of 1024 sequences at loss 5.83, at 3e-3 at 5.25;
  uniform is 6.24), 1e-4 (BERT-base) and 6e-4 (GPT-2 small) for the full ones; weight decay 0.01
  (BERT) and 0.1 (GPT-2).
* a plug-in model (``package.module:factory``) gets momentum SGD at 0.05, cosine, no warmup.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hetero_ps.errors import ConfigError

# The JobConfig fields a recipe supplies, in the order they are printed.
KNOBS = ("optimizer", "lr", "momentum", "weight_decay", "lr_schedule", "warmup_steps")


@dataclass(frozen=True)
class Recipe:
    optimizer: str
    lr: float  # peak learning rate at a global batch of `lr_batch` (scaled linearly when `lr_batch` > 0)
    weight_decay: float
    warmup_share: float  # warmup over this share of the run's steps (rounded up; 0 = none)
    why: str
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    lr_batch: int = 0  # > 0: the linear scaling rule, lr × global_batch / lr_batch

    def values(self, global_batch: int, total_steps: int) -> dict:
        lr = self.lr * global_batch / self.lr_batch if self.lr_batch else self.lr
        warmup = math.ceil(self.warmup_share * total_steps) if self.warmup_share else 0
        return {
            "optimizer": self.optimizer,
            "lr": lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "lr_schedule": self.lr_schedule,
            "warmup_steps": warmup,
        }


PLUGIN_RECIPE = Recipe("momentum", 0.05, 0.0, 0.0, "a plug-in model: momentum SGD, cosine decay, no warmup")

RECIPES: dict[tuple[str, str], Recipe] = {
    ("simple_cnn", size): Recipe(
        "momentum", 0.05, 0.0, 0.0, "small and without BatchNorm: momentum SGD with cosine decay, no warmup needed"
    )
    for size in ("default", "tiny")
}
RECIPES.update(
    {
        ("resnet50", size): Recipe(
            "momentum",
            0.1,
            1e-4,
            0.05,
            "Goyal et al. 2017: lr 0.1 × B/256, warmup over 5 % of the steps, weight decay 1e-4",
            lr_batch=256,
        )
        for size in ("default", "tiny")
    }
)
RECIPES.update(
    {
        ("bert", "tiny"): Recipe("adamw", 1e-3, 0.01, 0.1, "a transformer from scratch: AdamW with 10 % warmup"),
        ("bert", "default"): Recipe("adamw", 1e-4, 0.01, 0.1, "BERT-base from scratch: AdamW 1e-4 with 10 % warmup"),
        ("gpt2", "tiny"): Recipe(
            "adamw", 3e-3, 0.1, 0.1, "a small language model from scratch: AdamW with 10 % warmup"
        ),
        ("gpt2", "default"): Recipe("adamw", 6e-4, 0.1, 0.1, "GPT-2 small from scratch: AdamW 6e-4 with 10 % warmup"),
    }
)


# A recipe's learning rate is for its own optimizer: with another one chosen by flag and no --lr,
# the usual starting point of that optimizer is taken instead (AdamW at SGD's 0.1 diverges).
OPTIMIZER_LR = {"sgd": 0.05, "momentum": 0.05, "adam": 1e-3, "adamw": 1e-3}


def recipe_for(model: str, model_size: str) -> Recipe:
    """The recipe of a built-in model at a size, or the plug-in recipe for any other model."""
    return RECIPES.get((model, model_size), PLUGIN_RECIPE)


def unresolved(job) -> list[str]:
    """The knobs of ``job`` still left to the recipe (``None``)."""
    return [k for k in KNOBS if getattr(job, k) is None]


def outer_step(job) -> tuple[float, float]:
    """``--sync local``'s outer step ``(lr, momentum)``: the job's, or by its inner optimizer. After an
    adaptive one (adam, adamw) DiLoCo's Nesterov 0.7 / 0.9: gpt2 tiny at 16 inner steps reached a
    perplexity of 32.9 with it against 45.3 by averaging (BSP: 35.5). After SGD or momentum, plain
    averaging (1 / 0; the round of one inner step is then a BSP step): DiLoCo's diverged within seven
    rounds of 8 steps on the 10.5 M MLP, whose inner momentum it multiplies (benchmarks/RESULTS_links.md)."""
    lr, mu = (0.7, 0.9) if job.optimizer in ("adam", "adamw") else (1.0, 0.0)
    return (
        lr if job.outer_lr is None else float(job.outer_lr),
        mu if job.outer_momentum is None else float(job.outer_momentum),
    )


def resolve(job, total_steps: int):
    """``(job with every knob set, {knob: "flag" | "recipe"})``; a set value always wins."""
    if total_steps < 1:
        raise ConfigError(f"a run of {total_steps} steps cannot be trained")
    recipe = recipe_for(job.model, job.model_size)
    defaults = recipe.values(job.global_batch, total_steps)
    if job.optimizer is not None and job.optimizer != recipe.optimizer and job.optimizer in OPTIMIZER_LR:
        defaults["lr"] = OPTIMIZER_LR[job.optimizer]
    missing = unresolved(job)
    source = {k: "recipe" if k in missing else "flag" for k in KNOBS}
    job = dataclasses.replace(job, **{k: defaults[k] for k in missing})
    if job.sync == "local":
        outer_lr, outer_momentum = outer_step(job)
        job = dataclasses.replace(job, outer_lr=outer_lr, outer_momentum=outer_momentum)
    return job, source


def describe(job, source: dict) -> str:
    """One line for people: the resolved knobs that matter for this optimizer, and which came from flags."""
    parts = [f"{job.optimizer}", f"lr {job.lr:g}"]
    if job.optimizer == "momentum":
        parts.append(f"momentum {job.momentum:g}")
    parts += [f"weight decay {job.weight_decay:g}", f"{job.lr_schedule} schedule", f"warmup {job.warmup_steps} steps"]
    flags = [k.replace("_", "-") for k in KNOBS if source.get(k) == "flag"]
    recipe = recipe_for(job.model, job.model_size)
    said = f"recipe for {job.model} ({job.model_size}): " + ", ".join(parts)
    said += f" — {recipe.why}"
    if flags:
        said += f"; set by flag: {', '.join('--' + f for f in flags)}"
    return said
