"""A worker's local compute (mean gradient over its share of the step) and the master's evaluation.

``LocalTrainer.compute_gradient(indices)`` leaves in ``flat.grads``

    g = (1 / b) · Σ_{j ∈ indices} ∇ℓ_j(θ)          (b = len(indices))

the mean over *samples*, so the server's ``Σ_i (b_i / B) · g_i`` is exactly the gradient of the union
batch. The per-sample loss ``ℓ_j`` is:

* ``job.loss = "module:fn"`` → ``fn(output, target)``, which must return the batch mean;
* else a model output with ``.loss`` (transformers): ``gpt2`` is called with ``labels=input_ids``
  (next-token loss, mean over tokens — every sample has the same number of tokens, so this is also
  the mean over samples), ``bert`` with ``labels=target``;
* else cross-entropy of the logits (``(B, C)`` against ``(B,)``, or ``(B, T, V)`` against ``(B, T)``).

With ``micro_batch`` set, a share larger than that is processed in pieces whose gradients are
accumulated with weights ``b_k / b`` — the same mean, in less memory.

A non-finite loss or gradient sets ``StepStats.nonfinite``. The gradient is left as computed, so an
aggregate that includes it is itself non-finite and the server's finiteness check skips the step:
a NaN is reported and never silently applied.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hetero_ps.training.data import collate, to_device
from hetero_ps.training.optim import all_finite, build_optimizer
from hetero_ps.training.plugins import load_callable


@dataclass
class StepStats:
    """What one ``compute_gradient`` did."""

    loss: float  # mean loss over the samples (NaN/Inf if it was)
    count: int  # samples
    compute_s: float  # wall seconds: fetch + forward + backward (+ device sync)
    nonfinite: bool  # the loss or the gradient has a NaN or Inf
    data_s: float = 0.0  # of which: fetching and moving the batch


def resolve_loss(job):
    """The job's custom loss function, or None for the default."""
    return load_callable(job.loss, "loss function") if getattr(job, "loss", "") else None


def _forward(model, task: str, x, y):
    """The model's output for a batch (transformers get their labels so they compute ``.loss``)."""
    if task == "lm":
        return model(input_ids=x, labels=x)
    if task == "hf_classification":
        return model(input_ids=x, labels=y)
    return model(x)


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    return getattr(out, "logits", None)


def batch_loss(out, y, loss_fn=None) -> torch.Tensor:
    """The mean loss of one batch's output (see the module docstring for which loss)."""
    if loss_fn is not None:
        loss = loss_fn(out, y)
    elif getattr(out, "loss", None) is not None:
        loss = out.loss
    else:
        logits = _logits(out)
        if logits is None:
            raise TypeError(
                f"cannot compute a loss from a {type(out).__name__}: return logits, an object "
                "with .loss, or set job.loss to module:fn(output, target)"
            )
        if logits.dim() > 2 and y.dim() == logits.dim() - 1:  # (B, T, V) vs (B, T)
            loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
        else:
            loss = F.cross_entropy(logits, y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("the loss must be a scalar tensor (the mean over the batch)")
    return loss.reshape(())


class LocalTrainer:
    """Computes mean gradients into ``flat.grads`` for slices of the training set."""

    def __init__(self, job, model: torch.nn.Module, flat, train_set, info=None, device="cpu", micro_batch: int = 0):
        self.job, self.model, self.flat, self.train_set, self.info = job, model, flat, train_set, info
        self.device = torch.device(device)
        if flat.device != self.device:
            raise ValueError(
                f"model parameters are on {flat.device} but the trainer runs on {self.device}: "
                "move the model before building FlatParams"
            )
        self.micro_batch = int(micro_batch)
        self.task = getattr(model, "hetero_ps_task", "plain")
        self.loss_fn = resolve_loss(job)

    def compute_gradient(self, indices, before_last_backward: Callable[[], None] | None = None) -> StepStats:
        """Mean gradient over the samples ``indices`` into ``flat.grads``; see the module docstring.

        ``before_last_backward`` is called just before the backward pass that makes the gradients
        final (the last micro-batch's): the worker arms its push-as-ready hooks there."""
        t0 = time.perf_counter()
        idx = np.asarray(indices, dtype=np.int64)
        b = len(idx)
        if b == 0:
            raise ValueError("compute_gradient needs at least one sample")
        self.model.train()
        self.flat.zero_grad_()
        step = self.micro_batch if self.micro_batch > 0 else b
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        data_s = 0.0
        for s in range(0, b, step):
            part = idx[s : s + step]
            td = time.perf_counter()
            x, y = collate(self.train_set, part)
            x, y = to_device(x, self.device), to_device(y, self.device)
            data_s += time.perf_counter() - td
            loss = batch_loss(_forward(self.model, self.task, x, y), y, self.loss_fn)
            w = len(part) / b
            if before_last_backward is not None and s + step >= b:
                before_last_backward()
            (loss * w).backward()
            total += loss.detach().float() * w
        loss_value = float(total)  # syncs the device
        finite = math.isfinite(loss_value) and all_finite(self.flat.grads)
        return StepStats(
            loss=loss_value, count=b, compute_s=time.perf_counter() - t0, nonfinite=not finite, data_s=data_s
        )

    def local_round(self, indices, steps: int, optimizer: torch.optim.Optimizer, lr: float) -> StepStats:
        """``--sync local``: ``steps`` inner steps of ``optimizer`` (over ``flat.params``, its gradient
        ``flat.grads``) on consecutive near-equal parts of ``indices``; leaves the parameter change
        ``θ_start − θ_end`` in ``flat.grads`` and ``θ_start`` back in ``flat.params``.

        The loss is the sample-weighted mean over the inner steps. A non-finite inner step ends the
        round with a change of NaN (so the master never applies it); the caller resets the optimizer."""
        t0 = time.perf_counter()
        parts = [p for p in np.array_split(np.asarray(indices, dtype=np.int64), max(1, steps)) if len(p)]
        if not parts:
            raise ValueError("local_round needs at least one sample")
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = self.flat.params.detach().clone()
        loss_sum, count, data_s, nonfinite = 0.0, 0, 0.0, False
        for part in parts:
            stats = self.compute_gradient(part)
            data_s += stats.data_s
            count += stats.count
            if stats.nonfinite:
                nonfinite = True
                break
            loss_sum += stats.loss * stats.count
            optimizer.step()
        with torch.no_grad():
            delta = self.flat.grads
            torch.sub(start, self.flat.params, out=delta)
            if nonfinite:
                delta.fill_(float("nan"))
            self.flat.params.copy_(start)
        return StepStats(
            loss=float("nan") if nonfinite else loss_sum / count,
            count=len(indices),
            compute_s=time.perf_counter() - t0,
            nonfinite=nonfinite or not all_finite(delta),
            data_s=data_s,
        )


def inner_optimizer(job, flat) -> torch.optim.Optimizer:
    """The worker's own optimizer for ``--sync local`` rounds: the job's, over ``flat.params``, with
    ``flat.grads`` as its gradient (the round sets its learning rate)."""
    opt, _ = build_optimizer(job, flat.params, total_steps=1)
    opt.param_groups[0]["params"][0].grad = flat.grads
    return opt


def _accuracy_counts(task: str, out, x, y) -> tuple[int, int] | None:
    """(correct, total) predictions for this batch, or None when accuracy means nothing here."""
    logits = _logits(out)
    if logits is None:
        return None
    if task == "lm":  # next-token accuracy: position t predicts token t + 1
        pred = logits[:, :-1].argmax(-1)
        return int((pred == x[:, 1:]).sum()), pred.numel()
    if not isinstance(y, torch.Tensor) or y.is_floating_point():
        return None
    if logits.dim() == 2 and y.dim() == 1 and len(y) == len(logits):
        return int((logits.argmax(-1) == y).sum()), y.numel()
    if logits.dim() == 3 and y.shape == logits.shape[:2]:
        return int((logits.argmax(-1) == y).sum()), y.numel()
    return None


class EvaluationStopped(Exception):
    """``stop`` was set while evaluating (the master is shutting down); the result is not known."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise EvaluationStopped()


def recalibrate_batchnorm(
    model: torch.nn.Module,
    data,
    batches: int = 20,
    batch_size: int = 256,
    device=None,
    seed: int = 0,
    stop: threading.Event | None = None,
) -> bool:
    """Re-estimate BatchNorm running statistics with the current weights ("precise BN").

    Resets every BatchNorm's running mean/var, then averages the batch statistics of up to
    ``batches`` batches of ``data`` (a fixed seeded sample) in training mode, without gradients.
    Returns False (and does nothing) when the model has no BatchNorm with running statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return False
    device = device or next(model.parameters()).device
    task = getattr(model, "hetero_ps_task", "plain")
    momenta = [m.momentum for m in bns]
    was_training = model.training
    order = np.random.default_rng(seed).permutation(len(data))[: batches * batch_size]
    try:
        for m in bns:
            m.reset_running_stats()  # in place: flat buffer views stay valid
            m.momentum = None  # cumulative average over the batches below
        model.train()
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                _check(stop)  # between batches: a shutdown never waits for the whole pass
                x, y = collate(data, order[s : s + batch_size])
                _forward(model, task, to_device(x, device), to_device(y, device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return True


def evaluate(
    model: torch.nn.Module,
    eval_set,
    batch_size: int = 256,
    job=None,
    *,
    device=None,
    calib_set=None,
    max_samples: int = 0,
    stop: threading.Event | None = None,
) -> tuple[float, float | None]:
    """``(mean loss, accuracy)`` of ``model`` on ``eval_set`` (accuracy None when not meaningful).

    Accuracy is top-1 for classification and next-token accuracy for language models. With
    ``calib_set`` (the training set) BatchNorm statistics are first re-estimated on it
    (``recalibrate_batchnorm``); without it the model's own running statistics are used.
    ``max_samples`` > 0 evaluates only the first that many samples (and re-estimates BatchNorm on
    about as many). Setting ``stop`` makes it raise :class:`EvaluationStopped` before the next batch.
    The model's train/eval mode is restored afterwards; gradients are untouched.
    """
    device = device or next(model.parameters()).device
    task = getattr(model, "hetero_ps_task", "plain")
    loss_fn = resolve_loss(job) if job is not None else None
    if calib_set is not None:
        batches = 20 if max_samples <= 0 else max(1, math.ceil(max_samples / batch_size))
        recalibrate_batchnorm(
            model,
            calib_set,
            batches=batches,
            batch_size=batch_size,
            device=device,
            seed=getattr(job, "seed", 0),
            stop=stop,
        )
    n = len(eval_set) if max_samples <= 0 else min(max_samples, len(eval_set))
    if n == 0:
        raise ValueError("cannot evaluate on an empty data set")
    was_training = model.training
    model.eval()
    loss_sum, correct, counted, acc_ok = 0.0, 0, 0, True
    try:
        with torch.no_grad():
            for s in range(0, n, batch_size):
                _check(stop)
                idx = np.arange(s, min(n, s + batch_size))
                x, y = collate(eval_set, idx)
                x, y = to_device(x, device), to_device(y, device)
                out = _forward(model, task, x, y)
                loss_sum += float(batch_loss(out, y, loss_fn)) * len(idx)
                c = _accuracy_counts(task, out, x, y) if acc_ok else None
                if c is None:
                    acc_ok = False
                else:
                    correct += c[0]
                    counted += c[1]
    finally:
        model.train(was_training)
    return loss_sum / n, (correct / counted if acc_ok and counted else None)
