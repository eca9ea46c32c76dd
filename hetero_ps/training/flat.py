"""All of a model's parameters (and gradients) as views into one contiguous fp32 buffer each.

Like DDP's gradient buckets with ``gradient_as_bucket_view=True``: after ``FlatParams(model)``

* ``flat.params`` is one 1-D float32 tensor of ``numel`` elements and every trainable parameter's
  ``.data`` is a view into it (offsets in ``model.parameters()`` order, shared/tied parameters once);
* ``flat.grads`` is one 1-D float32 tensor and every parameter's ``.grad`` is a view into it, kept
  for the life of the model. Because ``.grad`` is always defined, autograd accumulates in place
  (``grad += new``), so ``backward`` writes straight into ``flat.grads`` — no gather, no copy.

So one codec call per chunk of ``flat.grads`` pushes the whole gradient, and ``flat.load_(x)`` (or a
receive straight into ``flat.params``) updates every parameter at once.

Rules that keep the views intact (``check_views()`` verifies them):

* zero gradients with ``flat.zero_grad_()``, never ``model.zero_grad()`` / ``optimizer.zero_grad()``
  (their default ``set_to_none=True`` would detach ``.grad`` from the buffer; ``zero_grad_`` re-binds
  any gradient that was replaced);
* build ``FlatParams`` *after* ``model.to(device)`` — moving the model allocates new storage;
* parameters with ``requires_grad=False`` are left out (they are not trained, so not synced).
  Floating-point parameters of other dtypes are converted to float32.

Buffers (BatchNorm running statistics) are not gradients and are not averaged by the optimizer.
They get their own flat tensor, ``flat.buffers`` (float buffers only; integer counters such as
``num_batches_tracked`` stay separate), so a caller *can* ship them as one chunk. What hetero_ps does:
workers keep their own (in training mode BatchNorm normalises with the batch's statistics, so the
gradient never depends on them); the master, before evaluating, re-estimates them with its current
weights on training batches (``trainer.evaluate(..., calib_set=...)``, "precise BN"), so the
evaluation and the checkpoint use statistics of the final weights, not of whichever worker.
The built-in ``simple_cnn`` has no BatchNorm, so the union-batch identity holds exactly for it; with
BatchNorm the gradient of a worker's share depends on how the batch was split (as in DDP).
"""

from __future__ import annotations

import numpy as np
import torch


class FlatParams:
    """Flat fp32 parameter, gradient and buffer storage for ``module``. See the module docstring."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        seen: set[int] = set()
        entries = []
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if not p.is_floating_point():
                raise TypeError(f"parameter {name} has dtype {p.dtype}; only floating-point parameters train")
            entries.append((name, p))
        if not entries:
            raise ValueError("the model has no trainable parameters")
        devices = {p.device for _, p in entries}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.numel = sum(p.numel() for _, p in entries)
        self.params = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self.grads = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        self._layout = []
        self._params = []
        off = 0
        with torch.no_grad():
            for name, p in entries:
                n = p.numel()
                view = self.params[off : off + n].view(p.shape)
                view.copy_(p.detach())
                p.data = view
                p.grad = self.grads[off : off + n].view(p.shape)
                self._layout.append((name, tuple(p.shape), off, n))
                self._params.append(p)
                off += n
        self._init_buffers(module)

    def _init_buffers(self, module: torch.nn.Module) -> None:
        seen: set[int] = set()
        entries = []
        for name, b in module.named_buffers(remove_duplicate=False):
            if b is None or id(b) in seen or not b.is_floating_point() or b.device != self.device:
                continue
            seen.add(id(b))
            entries.append((name, b))
        self.buffer_numel = sum(b.numel() for _, b in entries)
        self.buffers = torch.empty(self.buffer_numel, dtype=torch.float32, device=self.device)
        self._buffer_layout = []
        off = 0
        with torch.no_grad():
            for name, b in entries:
                n = b.numel()
                view = self.buffers[off : off + n].view(b.shape)
                view.copy_(b)
                b.data = view  # same tensor object (modules keep their reference), new storage
                self._buffer_layout.append((name, tuple(b.shape), off, n))
                off += n

    # -- the API the server and worker use ---------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return 4 * self.numel

    def layout(self) -> list[tuple[str, tuple[int, ...], int, int]]:
        """``[(name, shape, offset, numel), ...]`` in flat order (for checks and debugging)."""
        return list(self._layout)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters, in ``layout()`` order."""
        return list(self._params)

    def buffer_layout(self) -> list[tuple[str, tuple[int, ...], int, int]]:
        return list(self._buffer_layout)

    def flat_buffers(self) -> torch.Tensor:
        """The float buffers (BatchNorm running stats) as one 1-D fp32 tensor (may be empty)."""
        return self.buffers

    def load_(self, flat: torch.Tensor | np.ndarray) -> None:
        """Copy a 1-D float32 tensor or numpy array of ``numel`` values into the parameters."""
        src = torch.as_tensor(flat)
        if src.dim() != 1 or src.numel() != self.numel:
            raise ValueError(f"expected {self.numel} parameter values, got shape {tuple(src.shape)}")
        with torch.no_grad():
            self.params.copy_(src)

    def zero_grad_(self) -> None:
        """Zero the flat gradient in place (re-binding any ``.grad`` someone replaced or cleared)."""
        self.grads.zero_()
        self.check_views(repair=True)

    def check_views(self, repair: bool = False) -> bool:
        """True when every parameter's data and grad still live in the flat buffers.

        A replaced ``.grad`` (``set_to_none``, assignment) is re-bound when ``repair``; a replaced
        ``.data`` (``model.to(...)`` after construction) cannot be repaired and raises.
        """
        ok = True
        pbase, gbase = self.params.data_ptr(), self.grads.data_ptr()
        for (name, _, off, _), p in zip(self._layout, self._params):
            if p.data_ptr() != pbase + 4 * off or p.dtype != torch.float32:
                raise RuntimeError(
                    f"parameter {name} no longer lives in the flat buffer (was the model moved "
                    "with .to() after FlatParams was built?)"
                )
            g = p.grad
            if g is None or g.data_ptr() != gbase + 4 * off:
                ok = False
                if repair:
                    p.grad = self.grads[off : off + p.numel()].view(p.shape)
        return ok

    def __repr__(self) -> str:
        return (
            f"FlatParams({len(self._layout)} tensors, {self.numel} params, "
            f"{self.buffer_numel} buffer values, {self.device})"
        )
