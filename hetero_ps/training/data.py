"""Data sets: built-ins and users' ``package.module:factory``, plus fast batch fetching by index.

``load_datasets(job) -> (train, eval, DatasetInfo)``; every node calls it with the same job and gets
the same data in the same order (the sampler then only ships indices).

Built-ins (``job.dataset``; ``job.dataset_args`` in brackets, unknown keys are an error):

* ``digits`` — scikit-learn's bundled 8×8 handwritten digits (real data, no download): 1 797 images,
  a fixed 80/20 split [``split_seed``=0], pixels scaled by 1/16 then standardised with the training
  split's mean and std; inputs float32 (1, 8, 8), 10 classes. The demo default.
* ``synthetic_image`` — learnable images, 3×32×32, 10 classes [``size``=5000 train samples,
  ``eval_size``=size/5, ``seed``=0, ``noise``=1.0]: each class has a fixed smooth random pattern;
  a sample is its class pattern times a random contrast in [0.5, 1.5] plus Gaussian noise.
* ``synthetic_text`` — token sequences for ``gpt2`` (next-token prediction: the model's own
  ``.loss``) and ``bert`` (sequence classification) [``size``=4000, ``eval_size``=size/5,
  ``seq_len``=64, ``vocab_size``=512, ``num_classes``=2, ``seed``=0, ``branch``=4, ``p_follow``=0.9]:
  class *c* owns a sparse Markov chain in which every token has ``branch`` likely successors; each
  step follows the chain with probability ``p_follow``, else draws a uniform token. Samples are
  ``(tokens int64 (seq_len,), class)``.
* ``cifar10`` — the python version of CIFAR-10 (``data_batch_1`` … ``data_batch_5``, ``test_batch``)
  from ``job.data_dir`` or ``job.data_dir/cifar-10-batches-py`` [``augment``=False: random crop with
  4-pixel padding and horizontal flips on the training split]. The files are pickles: they are read
  with a restricted unpickler that can only rebuild numpy arrays of plain dtypes, never run code.

A plugin ``package.module:factory`` is called as ``factory(**dataset_args)`` and returns
``(train, eval)`` — map-style datasets whose items are ``(input, target)`` — or
``(train, eval, info)`` with ``info`` a ``DatasetInfo`` or a dict of its fields.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from hetero_ps.errors import ConfigError, DataError
from hetero_ps.training.plugins import builtin, call_factory, is_plugin_name, load_callable, with_defaults


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its data."""

    name: str  # registry name or the plugin spec
    kind: str  # "image" | "text" | "custom"
    input_shape: tuple  # one sample's input shape, e.g. (1, 8, 8) or (64,)
    num_classes: int  # classes of the target (0 if not classification)
    vocab_size: int = 0  # text: token ids are in [0, vocab_size)
    seq_len: int = 0  # text: tokens per sample


# -- batches by index ------------------------------------------------------------------------------


def collate(dataset, indices) -> tuple:
    """``(inputs, targets)`` for the samples ``indices`` (any int sequence, numpy or tensor).

    Fast paths, in order: a dataset with ``get_batch(index_tensor)``; a ``TensorDataset`` (index the
    tensors directly: one gather per tensor); a ``Subset`` (map the indices, recurse). Anything else:
    ``dataset[i]`` per sample, stacked with torch's ``default_collate``. Out-of-range indices raise
    ``IndexError`` (never wrap around as negative tensor indices would).
    """
    if isinstance(indices, torch.Tensor):
        idx = indices.detach().to("cpu", torch.int64).reshape(-1)
    else:  # a copy: callers may pass read-only numpy views
        idx = torch.from_numpy(np.array(indices, dtype=np.int64))
    if idx.dim() != 1 or idx.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D list of indices, got shape {tuple(idx.shape)}")
    n = len(dataset)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        raise IndexError(f"sample index {lo if lo < 0 else hi} is outside a data set of {n} samples")
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(idx)
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) != 2:
            raise DataError(f"a TensorDataset must hold (inputs, targets), it holds {len(dataset.tensors)} tensors")
        return dataset.tensors[0][idx], dataset.tensors[1][idx]
    if isinstance(dataset, Subset):
        inner = torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64))
        return collate(dataset.dataset, inner[idx])
    items = [dataset[i] for i in idx.tolist()]
    batch = torch.utils.data.default_collate(items)
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise DataError("data set items must be (input, target) pairs")
    return batch[0], batch[1]


def to_device(obj, device):
    """Move a tensor, or the tensors inside a list/tuple/dict, to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# -- built-ins -------------------------------------------------------------------------------------


def _args(job, defaults: dict) -> dict:
    return with_defaults("data set", job.dataset, job.dataset_args, defaults)


def _positive(a: dict, *keys) -> None:
    for k in keys:
        if not isinstance(a[k], (int, float)) or a[k] <= 0:
            raise ConfigError(f"dataset argument {k} must be a positive number, got {a[k]!r}")


def _digits(job):
    from sklearn.datasets import load_digits

    a = _args(job, {"split_seed": 0})
    d = load_digits()
    x = d.data.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(a["split_seed"]).permutation(len(y))
    cut = int(round(0.8 * len(y)))
    tr, ev = perm[:cut], perm[cut:]
    mean, std = float(x[tr].mean()), float(x[tr].std())
    x = (x - mean) / std
    info = DatasetInfo("digits", "image", (1, 8, 8), 10)
    return (
        TensorDataset(torch.from_numpy(x[tr]), torch.from_numpy(y[tr])),
        TensorDataset(torch.from_numpy(x[ev]), torch.from_numpy(y[ev])),
        info,
    )


def _synthetic_image(job):
    a = _args(job, {"size": 5000, "eval_size": 0, "seed": 0, "noise": 1.0})
    _positive(a, "size", "noise")
    n_train = int(a["size"])
    n_eval = int(a["eval_size"]) or max(1, n_train // 5)
    classes, shape = 10, (3, 32, 32)
    g = torch.Generator().manual_seed(int(a["seed"]))
    # Smooth class patterns: 8×8 noise upsampled, so small convolutions can pick them up.
    coarse = torch.randn(classes, 3, 8, 8, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    patterns /= patterns.flatten(1).std(dim=1).view(-1, 1, 1, 1)

    def make(n):
        y = torch.randint(0, classes, (n,), generator=g)
        contrast = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.5, generator=g)
        x = patterns[y] * contrast + float(a["noise"]) * torch.randn(n, *shape, generator=g)
        return TensorDataset(x.float(), y.long())

    train, ev = make(n_train), make(n_eval)
    return train, ev, DatasetInfo("synthetic_image", "image", shape, classes)


def _synthetic_text(job):
    a = _args(
        job,
        {
            "size": 4000,
            "eval_size": 0,
            "seq_len": 64,
            "vocab_size": 512,
            "num_classes": 2,
            "seed": 0,
            "branch": 4,
            "p_follow": 0.9,
        },
    )
    _positive(a, "size", "seq_len", "vocab_size", "num_classes", "branch")
    if not 0.0 <= a["p_follow"] <= 1.0:
        raise ConfigError(f"dataset argument p_follow must be in [0, 1], got {a['p_follow']}")
    n_train = int(a["size"])
    n_eval = int(a["eval_size"]) or max(1, n_train // 5)
    v, t, c, br = int(a["vocab_size"]), int(a["seq_len"]), int(a["num_classes"]), int(a["branch"])
    if v < 2 or t < 2:
        raise ConfigError("synthetic_text needs vocab_size >= 2 and seq_len >= 2")
    rng = np.random.default_rng(int(a["seed"]))
    successors = rng.integers(0, v, size=(c, v, br))  # class, token → its likely next tokens

    def make(n):
        y = rng.integers(0, c, size=n)
        tok = np.empty((n, t), dtype=np.int64)
        tok[:, 0] = rng.integers(0, v, size=n)
        for j in range(1, t):
            follow = rng.random(n) < a["p_follow"]
            nxt = successors[y, tok[:, j - 1], rng.integers(0, br, size=n)]
            tok[:, j] = np.where(follow, nxt, rng.integers(0, v, size=n))
        return TensorDataset(torch.from_numpy(tok), torch.from_numpy(y.astype(np.int64)))

    train, ev = make(n_train), make(n_eval)
    return train, ev, DatasetInfo("synthetic_text", "text", (t,), c, vocab_size=v, seq_len=t)


# -- CIFAR-10 --------------------------------------------------------------------------------------

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _safe_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject or dt.kind == "V":
        raise pickle.UnpicklingError(f"refusing numpy dtype {dt} (objects or raw records)")
    return dt


def _safe_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("refusing an ndarray subclass")
    return np._core.multiarray._reconstruct(subtype, shape, _safe_dtype(dtype))


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain data and numpy arrays: the globals allowed are exactly these.

    ``numpy.(_)core.multiarray._reconstruct`` and ``numpy.ndarray`` rebuild an array, ``numpy.dtype``
    its dtype (object and void dtypes refused), ``_codecs.encode`` turns a str into bytes (how
    Python 3 writes ``bytes`` at protocol 2). Any other global — ``os.system``, a class — raises
    ``pickle.UnpicklingError`` before anything is called.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("_codecs", "encode"): __import__("codecs").encode,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a data file") from None


def restricted_load(path: str):
    with open(path, "rb") as f:
        data = f.read()
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _cifar_dir(job) -> str:
    base = job.data_dir or "data"
    for d in (base, os.path.join(base, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(d, CIFAR_TEST_FILE)) or os.path.isfile(os.path.join(d, "data_batch_1")):
            return d
    return os.path.join(base, "cifar-10-batches-py")


def _cifar_missing(where: str, missing: list[str]) -> DataError:
    parent = os.path.dirname(os.path.abspath(where))
    return DataError(
        f"CIFAR-10 is not where hetero_ps looks for it: missing {', '.join(missing)} in {os.path.abspath(where)}. "
        f"Put the python version's files data_batch_1 … data_batch_5 and test_batch in that directory on every "
        f"node: download {CIFAR_URL} (from https://www.cs.toronto.edu/~kriz/cifar.html) and run "
        f"`tar xzf cifar-10-python.tar.gz -C {parent}`, or pass --data-dir DIR (or HETERO_PS_DATA_DIR) where "
        f"DIR or DIR/cifar-10-batches-py holds them."
    )


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = restricted_load(path)
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        UnicodeDecodeError,
    ) as exc:
        raise DataError(f"{path} is not a CIFAR-10 python batch file: {exc}") from exc
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (expected a dict, got {type(d).__name__})")
    get = lambda k: d.get(k.encode(), d.get(k))  # noqa: E731 — py2 files have bytes keys
    x, y = get("data"), get("labels")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(
            f"{path}: 'data' must be a uint8 array of shape (N, 3072), got "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    try:
        y = np.asarray(y, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' must be a list of integers ({exc})") from None
    if y.shape != (x.shape[0],) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"{path}: expected {x.shape[0]} labels in 0..9, got shape {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


class Cifar10(Dataset):
    """CIFAR-10 kept as uint8 (150 MB for the training split); normalised per batch in ``get_batch``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, augment: bool = False, seed: int = 0):
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(y)
        self.augment = augment
        self._gen = torch.Generator().manual_seed(seed)
        self._mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        x, y = self.get_batch(torch.tensor([int(i)]))
        return x[0], y[0]

    def get_batch(self, idx: torch.Tensor):
        x = self.x[idx].float().div_(255.0)  # (b, 3, 32, 32)
        if self.augment:
            b = x.shape[0]
            padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
            off = torch.randint(0, 9, (b, 2), generator=self._gen)
            x = torch.stack([padded[i, :, r : r + 32, c : c + 32] for i, (r, c) in enumerate(off.tolist())])
            flip = torch.rand(b, generator=self._gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return (x - self._mean) / self._std, self.y[idx]


def _cifar10(job):
    a = _args(job, {"augment": False, "seed": 0})
    where = _cifar_dir(job)
    missing = [f for f in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE) if not os.path.isfile(os.path.join(where, f))]
    if missing:
        raise _cifar_missing(where, missing)
    parts = [_read_cifar_batch(os.path.join(where, f)) for f in CIFAR_TRAIN_FILES]
    xt, yt = _read_cifar_batch(os.path.join(where, CIFAR_TEST_FILE))
    train = Cifar10(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        augment=bool(a["augment"]),
        seed=int(a["seed"]),
    )
    return train, Cifar10(xt, yt), DatasetInfo("cifar10", "image", (3, 32, 32), 10)


DATASETS = {
    "digits": _digits,
    "synthetic_image": _synthetic_image,
    "synthetic_text": _synthetic_text,
    "cifar10": _cifar10,
}


# -- plugins ---------------------------------------------------------------------------------------


def _infer_info(spec: str, train) -> DatasetInfo:
    x, y = train[0]
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(np.shape(x))
    num_classes = getattr(train, "num_classes", None)
    if num_classes is None and hasattr(train, "classes"):
        num_classes = len(train.classes)
    if num_classes is None:
        if isinstance(train, TensorDataset) and len(train.tensors) == 2:
            targets = train.tensors[1]
        elif len(train) <= 200_000:
            targets = torch.as_tensor(np.asarray([train[i][1] for i in range(len(train))]))
        else:
            targets = None
        if targets is not None and not targets.is_floating_point() and targets.dim() == 1:
            num_classes = int(targets.max()) + 1
    return DatasetInfo(
        spec, "custom", shape, int(num_classes or 0), vocab_size=int(getattr(train, "vocab_size", 0) or 0)
    )


def _plugin(job):
    fn = load_callable(job.dataset, "data set factory")
    out = call_factory(fn, dict(job.dataset_args), job.dataset, "data set factory")
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise ConfigError(
            f"data set factory {job.dataset!r} must return (train, eval) or (train, eval, info), "
            f"got {type(out).__name__}"
        )
    train, ev = out[0], out[1]
    for label, ds in (("train", train), ("eval", ev)):
        if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
            raise ConfigError(f"data set factory {job.dataset!r}: the {label} split is not a map-style dataset")
        if len(ds) == 0:
            raise DataError(f"data set factory {job.dataset!r}: the {label} split is empty")
    if len(out) == 3:
        info = out[2]
        if isinstance(info, dict):
            info = DatasetInfo(**{"name": job.dataset, "kind": "custom", **info})
        if not isinstance(info, DatasetInfo):
            raise ConfigError(f"data set factory {job.dataset!r}: the third value must be a DatasetInfo or dict")
    else:
        info = _infer_info(job.dataset, train)
    return train, ev, info


def load_datasets(job) -> tuple:
    """``(train, eval, DatasetInfo)`` for ``job.dataset`` (a built-in name or ``module:factory``)."""
    if is_plugin_name(job.dataset):
        return _plugin(job)
    return builtin(DATASETS, "data set", job.dataset)(job)
