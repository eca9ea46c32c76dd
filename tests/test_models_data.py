"""Model and data-set registries, plugins, CIFAR-10 files (and hostile pickles), the local trainer."""

from __future__ import annotations

import os
import pickle
import textwrap

import numpy as np
import pytest
import torch

from hetero_ps.config import JobConfig
from hetero_ps.errors import ConfigError, DataError
from hetero_ps.training import data
from hetero_ps.training.data import DatasetInfo, collate, load_datasets
from hetero_ps.training.flat import FlatParams
from hetero_ps.training.models import build_model
from hetero_ps.training.trainer import LocalTrainer, evaluate, recalibrate_batchnorm


def _setup(**kw):
    job = JobConfig(**kw)
    train, ev, info = load_datasets(job)
    model = build_model(job, info)
    flat = FlatParams(model)
    return job, train, ev, info, model, flat


@pytest.mark.parametrize(
    "model,dataset,size,args",
    [
        ("simple_cnn", "digits", "default", {}),
        ("simple_cnn", "synthetic_image", "default", {"size": 64}),
        ("simple_cnn", "synthetic_image", "tiny", {"size": 64}),
        ("bert", "synthetic_text", "tiny", {"size": 32, "seq_len": 16}),
        ("gpt2", "synthetic_text", "tiny", {"size": 32, "seq_len": 16}),
        ("resnet50", "synthetic_image", "tiny", {"size": 8}),
    ],
    ids=["cnn-digits", "cnn-image", "cnn-image-tiny", "bert-tiny", "gpt2-tiny", "resnet50-tiny"],
)
def test_builtin_model_trains_a_step_on_its_data(model, dataset, size, args):
    job, train, _, info, m, flat = _setup(model=model, dataset=dataset, model_size=size, dataset_args=args)
    trainer = LocalTrainer(job, m, flat, train, info, "cpu")
    stats = trainer.compute_gradient(np.arange(4))
    assert stats.count == 4 and np.isfinite(stats.loss) and not stats.nonfinite
    assert stats.compute_s > 0
    assert float(flat.grads.abs().sum()) > 0, "backward must write into the flat gradient"
    assert flat.check_views()


def test_resnet50_default_builds_with_real_size_and_runs_forward():
    job = JobConfig(model="resnet50", dataset="synthetic_image", seed=3)
    info = DatasetInfo("synthetic_image", "image", (3, 32, 32), 10)
    m = build_model(job, info)
    n = sum(p.numel() for p in m.parameters())
    assert 23_000_000 < n < 24_000_000  # ResNet-50 with a 10-class head
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_simple_cnn_adapts_to_input_and_classes():
    job = JobConfig(model="simple_cnn")
    for shape, classes in (((1, 8, 8), 10), ((3, 32, 32), 7), ((3, 64, 64), 3)):
        m = build_model(job, DatasetInfo("x", "image", shape, classes))
        assert m(torch.randn(2, *shape)).shape == (2, classes)


def test_same_seed_same_weights_other_seed_other_weights():
    info = DatasetInfo("digits", "image", (1, 8, 8), 10)
    before = torch.random.get_rng_state()
    a = FlatParams(build_model(JobConfig(seed=5), info)).params
    b = FlatParams(build_model(JobConfig(seed=5), info)).params
    c = FlatParams(build_model(JobConfig(seed=6), info)).params
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), before), "building a model must not move the global RNG"


def test_gpt2_uses_the_data_sets_vocabulary_and_model_args_override_config():
    job = JobConfig(model="gpt2", model_size="tiny", dataset="synthetic_text", model_args={"n_layer": 1})
    info = DatasetInfo("synthetic_text", "text", (16,), 2, vocab_size=100, seq_len=16)
    m = build_model(job, info)
    assert m.config.vocab_size == 100 and m.config.n_layer == 1 and m.hetero_ps_task == "lm"
    with pytest.raises(ConfigError, match="no field 'not_a_field'"):
        build_model(JobConfig(model="gpt2", model_size="tiny", model_args={"not_a_field": 1}), info)


def test_unknown_names_and_arguments_list_the_choices():
    with pytest.raises(ConfigError, match="simple_cnn, resnet50, bert, gpt2"):
        build_model(JobConfig(model="alexnet"), DatasetInfo("d", "image", (1, 8, 8), 10))
    with pytest.raises(ConfigError, match="digits, synthetic_image, synthetic_text, cifar10"):
        load_datasets(JobConfig(dataset="mnist"))
    with pytest.raises(ConfigError, match="does not take.*'sizee'"):
        load_datasets(JobConfig(dataset="synthetic_image", dataset_args={"sizee": 3}))
    with pytest.raises(ConfigError, match="does not take.*'depth'.*width"):
        build_model(JobConfig(model_args={"depth": 3}), DatasetInfo("d", "image", (1, 8, 8), 10))
    with pytest.raises(ConfigError, match="needs a text data set"):
        build_model(JobConfig(model="bert"), DatasetInfo("digits", "image", (1, 8, 8), 10))
    with pytest.raises(ConfigError, match="model_size"):
        build_model(JobConfig(model_size="huge"), DatasetInfo("d", "image", (1, 8, 8), 10))


PLUGIN = textwrap.dedent("""
    import torch

    def make_model(hidden=8, act="tanh"):
        assert isinstance(hidden, int)
        return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))

    def make_data(n=50):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return torch.utils.data.TensorDataset(x[:40], y[:40]), torch.utils.data.TensorDataset(x[40:], y[40:])

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 10
        def __getitem__(self, i):
            return torch.full((4,), float(i)), i % 3

    def make_generic():
        return Pairs(), Pairs(), {"num_classes": 3, "input_shape": (4,)}

    def mse(out, target):
        return ((out - torch.nn.functional.one_hot(target, 3).float()) ** 2).mean()

    NOT_CALLABLE = 3
""")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    mod = tmp_path / "hp_test_plugin.py"
    mod.write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "hp_test_plugin"


def test_plugin_model_and_dataset(plugin):
    job = JobConfig(
        model=f"{plugin}:make_model", model_args={"hidden": 16}, dataset=f"{plugin}:make_data", loss=f"{plugin}:mse"
    )
    train, ev, info = load_datasets(job)
    assert info.num_classes == 3 and info.input_shape == (4,) and len(train) == 40 and len(ev) == 10
    m = build_model(job, info)
    assert m[0].out_features == 16
    flat = FlatParams(m)
    stats = LocalTrainer(job, m, flat, train, info).compute_gradient([0, 5, 7])
    x, y = collate(train, [0, 5, 7])
    ref = ((m(x) - torch.nn.functional.one_hot(y, 3).float()) ** 2).mean()
    assert stats.loss == pytest.approx(float(ref.detach()), rel=1e-6)
    loss, acc = evaluate(m, ev, 4, job)
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0


def test_plugin_generic_dataset_with_info(plugin):
    train, _, info = load_datasets(JobConfig(dataset=f"{plugin}:make_generic"))
    assert info.num_classes == 3 and info.kind == "custom"
    x, y = collate(train, [2, 4])
    assert x.shape == (2, 4) and y.tolist() == [2, 1] and float(x[1, 0]) == 4.0


def test_plugin_errors_name_module_and_attribute(plugin):
    with pytest.raises(ConfigError, match=f"module '{plugin}'.*no attribute 'nope'.*make_model"):
        build_model(JobConfig(model=f"{plugin}:nope"))
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        load_datasets(JobConfig(dataset="no_such_module_xyz:make"))
    with pytest.raises(ConfigError, match="not something callable"):
        build_model(JobConfig(model=f"{plugin}:NOT_CALLABLE"))
    with pytest.raises(ConfigError, match="does not accept the arguments"):
        build_model(JobConfig(model=f"{plugin}:make_model", model_args={"depth": 2}))


# -- data ----------------------------------------------------------------------------------------


def test_digits_split_normalisation_and_determinism():
    train, ev, info = load_datasets(JobConfig())
    assert info == DatasetInfo("digits", "image", (1, 8, 8), 10)
    assert len(train) + len(ev) == 1797 and abs(len(train) - 0.8 * 1797) < 1
    x = train.tensors[0]
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2
    train2, ev2, _ = load_datasets(JobConfig(seed=9))  # the split does not follow the model seed
    assert torch.equal(ev.tensors[0], ev2.tensors[0])
    assert set(ev.tensors[1].tolist()) == set(range(10))


def test_synthetic_sets_are_seeded_and_learnable_structure():
    args = {"size": 2000, "seq_len": 64}
    a = load_datasets(JobConfig(dataset="synthetic_text", dataset_args=args))
    b = load_datasets(JobConfig(dataset="synthetic_text", dataset_args=args))
    c = load_datasets(JobConfig(dataset="synthetic_text", dataset_args={**args, "seed": 1}))
    assert torch.equal(a[0].tensors[0], b[0].tensors[0]) and not torch.equal(a[0].tensors[0], c[0].tensors[0])
    tok, label = a[0].tensors
    assert tok.dtype == torch.int64 and int(tok.min()) >= 0 and int(tok.max()) < 512
    # Structure: within a class, the 4 most frequent successors of a token carry most transitions
    # (about p_follow = 0.9); for uniform tokens they would carry under 10 %.
    for cls in (0, 1):
        t = tok[label == cls]
        counts = torch.zeros(512, 512)
        counts.index_put_((t[:, :-1].reshape(-1), t[:, 1:].reshape(-1)), torch.ones(t[:, 1:].numel()), accumulate=True)
        assert float(counts.topk(4, dim=1).values.sum() / counts.sum()) > 0.8
    img = load_datasets(JobConfig(dataset="synthetic_image", dataset_args={"size": 100}))
    assert img[0].tensors[0].shape == (100, 3, 32, 32) and len(img[1]) == 20


def test_collate_fast_paths_agree_with_per_item_and_check_bounds():
    x, y = torch.randn(20, 3), torch.arange(20)
    ds = torch.utils.data.TensorDataset(x, y)
    idx = np.array([3, 1, 19, 3])
    bx, by = collate(ds, idx)
    assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx])
    sub = torch.utils.data.Subset(ds, [5, 6, 7, 8])
    sx, sy = collate(sub, [0, 3])
    assert sy.tolist() == [5, 8]

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return x[i], y[i]

    px, py = collate(Plain(), idx)
    assert torch.equal(px, bx) and torch.equal(py, by)
    for bad in ([20], [-1]):
        with pytest.raises(IndexError):
            collate(ds, bad)


# -- CIFAR-10 ------------------------------------------------------------------------------------


def _write_fake_cifar(d, n=6, seed=0):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in (*data.CIFAR_TRAIN_FILES, data.CIFAR_TEST_FILE):
        batch = {
            b"batch_label": b"fake",
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"filenames": [b"x.png"] * n,
        }
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)  # like the real files (written by Python 2)


def test_cifar10_missing_directory_says_which_files_to_put_where(tmp_path):
    with pytest.raises(DataError) as e:
        load_datasets(JobConfig(dataset="cifar10", data_dir=str(tmp_path / "nowhere")))
    msg = str(e.value)
    for needed in (
        "data_batch_1",
        "data_batch_5",
        "test_batch",
        "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "--data-dir",
    ):
        assert needed in msg, needed


def test_cifar10_reports_the_one_missing_file(tmp_path):
    _write_fake_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(DataError, match="missing data_batch_3 in"):
        load_datasets(JobConfig(dataset="cifar10", data_dir=str(tmp_path)))


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar10_loads_the_python_batches(tmp_path, sub):
    _write_fake_cifar(tmp_path / sub if sub else tmp_path)
    job = JobConfig(dataset="cifar10", data_dir=str(tmp_path), model_size="tiny")
    train, ev, info = load_datasets(job)
    assert len(train) == 30 and len(ev) == 6 and info.input_shape == (3, 32, 32) and info.num_classes == 10
    with open((tmp_path / sub if sub else tmp_path) / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    x, y = collate(train, [6, 7])  # the first two of data_batch_2
    assert y.tolist() == raw[b"labels"][:2]
    px = raw[b"data"][0].reshape(3, 32, 32).astype(np.float32) / 255.0
    want = (px - np.array(data.CIFAR_MEAN).reshape(3, 1, 1)) / np.array(data.CIFAR_STD).reshape(3, 1, 1)
    np.testing.assert_allclose(x[0].numpy(), want, rtol=1e-5, atol=1e-5)
    m = build_model(job, info)
    assert m(x).shape == (2, 10)
    aug = load_datasets(JobConfig(dataset="cifar10", data_dir=str(tmp_path), dataset_args={"augment": True}))[0]
    assert collate(aug, np.arange(8))[0].shape == (8, 3, 32, 32)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_without_running_anything(tmp_path):
    _write_fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load global .*system"):
        load_datasets(JobConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert not marker.exists()


def test_object_arrays_and_wrong_shapes_are_refused(tmp_path):
    _write_fake_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.array([1, "x"], dtype=object), b"labels": [1]}, f, protocol=2)
    with pytest.raises(DataError, match="refusing numpy dtype object"):
        load_datasets(JobConfig(dataset="cifar10", data_dir=str(tmp_path)))
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, f, protocol=2)
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        load_datasets(JobConfig(dataset="cifar10", data_dir=str(tmp_path)))


# -- trainer -------------------------------------------------------------------------------------


def test_micro_batches_give_the_same_mean_gradient():
    job, train, _, info, m, flat = _setup()
    idx = np.arange(10, 47)
    LocalTrainer(job, m, flat, train, info).compute_gradient(idx)
    whole = flat.grads.clone()
    stats = LocalTrainer(job, m, flat, train, info, micro_batch=8).compute_gradient(idx)
    torch.testing.assert_close(flat.grads, whole, rtol=1e-5, atol=1e-7)
    assert stats.count == 37


def test_nonfinite_loss_is_flagged_not_hidden():
    job, train, _, info, m, flat = _setup()
    with torch.no_grad():
        m.head[-1].bias[0] = float("nan")
    stats = LocalTrainer(job, m, flat, train, info).compute_gradient(np.arange(8))
    assert stats.nonfinite and not np.isfinite(stats.loss)
    assert not bool(torch.isfinite(flat.grads).all()), "the NaN stays, so the server's check sees it"


def test_evaluate_reports_accuracy_and_token_accuracy_and_restores_mode():
    job, train, ev, info, m, flat = _setup()
    m.train()
    loss, acc = evaluate(m, ev, 100, job)
    assert m.training and 0 <= acc <= 1 and loss > 0
    x, y = collate(ev, np.arange(len(ev)))
    with torch.no_grad():
        m.eval()
        want = torch.nn.functional.cross_entropy(m(x), y)
        assert acc == pytest.approx(float((m(x).argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(want), rel=1e-5)
    gjob, gtrain, gev, ginfo, gm, _ = _setup(
        model="gpt2", model_size="tiny", dataset="synthetic_text", dataset_args={"size": 20, "seq_len": 16}
    )
    gloss, gacc = evaluate(gm, gev, 8, gjob)
    assert gloss == pytest.approx(np.log(512), rel=0.1) and 0 <= gacc < 0.05


def test_batchnorm_recalibration_keeps_flat_buffer_views():
    job = JobConfig(model="resnet50", model_size="tiny", dataset="synthetic_image", dataset_args={"size": 16})
    train, ev, info = load_datasets(job)
    m = build_model(job, info)
    flat = FlatParams(m)
    assert flat.buffer_numel > 0
    before = flat.buffers.clone()
    assert recalibrate_batchnorm(m, train, batches=1, batch_size=8)
    assert not torch.equal(flat.buffers, before), "running stats must live in (and update) the flat buffer"
    bn = m.bn1
    assert (
        bn.running_mean.data_ptr()
        == flat.buffers.data_ptr() + 4 * [o for n, _, o, _ in flat.buffer_layout() if n == "bn1.running_mean"][0]
    )
    assert not recalibrate_batchnorm(build_model(JobConfig(), DatasetInfo("d", "image", (1, 8, 8), 10)), train)
