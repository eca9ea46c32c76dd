"""Every built-in model learns with its own defaults: two workers, real sockets, tiny sizes.

No optimizer flag is given, so each run trains on its model's recipe (``training/recipes.py``), and
the test checks ``config.json`` says so. The margins are wide on purpose: each is what a model
that learns nothing cannot reach (chance accuracy, or the uniform loss ln V for a language model),
by a distance the recipe clears with room to spare (measured: see the README's model table).
"""

from __future__ import annotations

import json
import math
import os

import pytest
from conftest import read_jsonl

from hetero_ps.testing.local_cluster import LocalCluster

VOCAB = 512  # synthetic_text's default vocabulary

CASES = {
    # model: (its arguments, the data set's chance level, what the last evaluation must reach)
    "simple_cnn": (["--dataset", "synthetic_image", "--dataset-arg", "size=1024", "--epochs", "2"], 0.1, 0.6),
    "resnet50": (["--dataset", "digits", "--epochs", "1"], 0.1, 0.6),
    "bert": (["--dataset", "synthetic_text", "--dataset-arg", "size=2048", "--epochs", "2"], 0.5, 0.8),
    "gpt2": (["--dataset", "synthetic_text", "--dataset-arg", "size=1024", "--epochs", "2"], None, None),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("model", sorted(CASES))
def test_each_builtin_model_learns_with_its_defaults(tmp_path, model):
    args, chance, must_reach = CASES[model]
    server = ["--world-size", "3", "--no-local-worker", "--model", model, "--model-size", "tiny", *args]
    server += ["--global-batch-size", "32", "--experiment", model]
    workers = [["--rank", str(r), "--torch-threads", "1"] for r in (1, 2)]
    with LocalCluster(tmp_path, server, workers=workers) as c:
        assert c.wait(timeout=840) == 0, c.output("server")
        exp = c.experiment_dir()
        with open(os.path.join(exp, "config.json")) as f:
            config = json.load(f)
        evaluations = read_jsonl(os.path.join(exp, "metrics", "epochs.jsonl"))
        steps = read_jsonl(os.path.join(exp, "metrics", "steps.jsonl"))
        log = c.output("server")

    assert all(sorted(s["workers"]) == ["1", "2"] for s in steps)  # both trained every step
    assert set(config["recipe"]["source"].values()) == {"recipe"}, config["recipe"]
    assert f"recipe for {model} (tiny): {config['job']['optimizer']}" in log
    last = max(evaluations, key=lambda e: e["epoch"])
    if model == "gpt2":  # a language model: its loss against the uniform guess over the vocabulary
        assert last["eval_loss"] < math.log(VOCAB) - 0.5, (last, math.log(VOCAB))
    else:
        assert last["eval_accuracy"] >= must_reach > chance, last
