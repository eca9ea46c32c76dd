"""Models: built-ins sized from the data set, and users' ``package.module:factory``.

``build_model(job, info)`` builds with torch's RNG seeded by ``job.seed`` (inside ``fork_rng``, so the
caller's RNG is untouched): every node that runs the same code builds identical weights. (The master
still sends its parameters before the first step, so this is belt and braces.)

Built-ins (``job.model``; ``job.model_args`` in brackets, unknown keys are an error):

* ``simple_cnn`` — conv(3×3)·ReLU ×2, max-pool, one more conv·pool stage per halving down to 8×8,
  adaptive average pool to 4×4, MLP head. No BatchNorm and no dropout, so a worker's gradient does
  not depend on how the global batch was split. Adapts to ``info.input_shape`` (1×8×8 digits,
  3×32×32 images) and ``info.num_classes`` [``width``=32 (8 tiny), ``hidden``=128 (32 tiny)].
* ``resnet50`` — torchvision ResNet-50, random init, ``num_classes`` from the data; for inputs of
  64 pixels or less the stem is the usual CIFAR one (3×3 stride-1 conv, no max-pool) [``cifar_stem``
  = auto]. ``model_size="tiny"`` keeps the bottleneck blocks but one per stage.
* ``bert`` — transformers ``BertForSequenceClassification`` from a config (no download), vocabulary
  and sequence length from the data set; ``default`` is BERT-base (768 hidden, 12 layers), ``tiny``
  is 2 layers of 64 hidden, 2 heads. [any ``BertConfig`` field overrides]
* ``gpt2`` — transformers ``GPT2LMHeadModel`` from a config, vocabulary from the data set; ``default``
  is GPT-2 small (768, 12 layers), ``tiny`` 2 layers of 64, 2 heads. [any ``GPT2Config`` field]

Each built model carries ``model.hetero_ps_task``: ``"lm"`` (call with ``labels=input_ids``, use
``.loss``), ``"hf_classification"`` (call with ``labels=target``) or ``"plain"`` (``model(x)`` then
the job's loss) — the trainer reads it.

A plugin ``package.module:factory`` is called as ``factory(**job.model_args)`` and must return an
``nn.Module``; it is treated as ``"plain"`` unless it sets ``hetero_ps_task`` itself.
"""

from __future__ import annotations

import torch
from torch import nn

from hetero_ps.errors import ConfigError
from hetero_ps.training.plugins import builtin, call_factory, is_plugin_name, load_callable, with_defaults

MODEL_SIZES = ("default", "tiny")


class SimpleCNN(nn.Module):
    """A small convolutional classifier for C×H×W images; see the module docstring."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32, hidden: int = 128):
        super().__init__()
        c1, c2 = width, 2 * width
        layers = [
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        size = image_size // 2
        while size > 8:  # (B, c2, size, size) → halve until 8×8
            layers += [nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            size //= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, classes)
        return self.head(self.pool(self.features(x)))


def _model_args(job, defaults: dict) -> dict:
    return with_defaults("model", job.model, job.model_args, defaults)


def _need(info, model: str, kind: str | None = None):
    if info is None:
        raise ConfigError(f"model {model!r} is sized from the data set: pass its DatasetInfo to build_model")
    if kind and info.kind != kind:
        raise ConfigError(
            f"model {model!r} needs a {kind} data set (e.g. "
            f"{'synthetic_text' if kind == 'text' else 'digits'}), but {info.name!r} is {info.kind}"
        )
    return info


def _image_dims(info, model: str) -> tuple[int, int, int]:
    shape = tuple(info.input_shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"model {model!r} needs square C×H×W images; data set {info.name!r} has inputs {shape}")
    if info.num_classes < 2:
        raise ConfigError(
            f"model {model!r} needs a classification data set; {info.name!r} has {info.num_classes} classes"
        )
    return shape


def _simple_cnn(job, info):
    c, h, _ = _image_dims(_need(info, "simple_cnn"), "simple_cnn")
    tiny = job.model_size == "tiny"
    a = _model_args(job, {"width": 8 if tiny else 32, "hidden": 32 if tiny else 128})
    return SimpleCNN(c, h, info.num_classes, width=int(a["width"]), hidden=int(a["hidden"])), "plain"


def _resnet50(job, info):
    from torchvision.models import resnet50
    from torchvision.models.resnet import Bottleneck, ResNet

    c, h, _ = _image_dims(_need(info, "resnet50"), "resnet50")
    a = _model_args(job, {"cifar_stem": "auto"})
    if job.model_size == "tiny":
        model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=info.num_classes)
    else:
        model = resnet50(weights=None, num_classes=info.num_classes)
    cifar = h <= 64 if a["cifar_stem"] == "auto" else bool(a["cifar_stem"])
    if cifar:
        model.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False)
    return model, "plain"


def _hf_config(cls, job, base: dict, tiny: dict):
    probe = cls()
    for k in job.model_args:
        if not hasattr(probe, k):
            raise ConfigError(f"model {job.model!r}: {cls.__name__} has no field {k!r} (from --model-arg)")
    return cls(**{**base, **(tiny if job.model_size == "tiny" else {}), **job.model_args})


def _bert(job, info):
    from transformers import BertConfig, BertForSequenceClassification

    info = _need(info, "bert", "text")
    if info.num_classes < 2:
        raise ConfigError(f"bert classifies sequences; data set {info.name!r} has {info.num_classes} classes")
    tiny = job.model_size == "tiny"
    cfg = _hf_config(
        BertConfig,
        job,
        {
            "vocab_size": info.vocab_size,
            "num_labels": info.num_classes,
            "max_position_embeddings": max(128 if tiny else 512, info.seq_len),
        },
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
    )
    return BertForSequenceClassification(cfg), "hf_classification"


def _gpt2(job, info):
    from transformers import GPT2Config, GPT2LMHeadModel

    info = _need(info, "gpt2", "text")
    tiny = job.model_size == "tiny"
    cfg = _hf_config(
        GPT2Config,
        job,
        {
            "vocab_size": info.vocab_size,
            "n_positions": max(128 if tiny else 1024, info.seq_len),
            # GPT-2's own end-of-text id (50256) is outside a small vocabulary: use the last id.
            "bos_token_id": info.vocab_size - 1,
            "eos_token_id": info.vocab_size - 1,
        },
        {"n_embd": 64, "n_layer": 2, "n_head": 2},
    )
    model = GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"  # transformers cannot infer it from the class name and warns
    return model, "lm"


MODELS = {"simple_cnn": _simple_cnn, "resnet50": _resnet50, "bert": _bert, "gpt2": _gpt2}


def _plugin(job, info):
    fn = load_callable(job.model, "model factory")
    model = call_factory(fn, dict(job.model_args), job.model, "model factory")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {job.model!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model, getattr(model, "hetero_ps_task", "plain")


def build_model(job, info=None) -> nn.Module:
    """The job's model on the CPU, initialised from ``job.seed``; ``info`` is the data set's DatasetInfo."""
    if job.model_size not in MODEL_SIZES:
        raise ConfigError(f"model_size must be one of {', '.join(MODEL_SIZES)}, got {job.model_size!r}")
    make = _plugin if is_plugin_name(job.model) else builtin(MODELS, "model", job.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        model, task = make(job, info)
    model.hetero_ps_task = task
    return model
