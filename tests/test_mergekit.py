"""mergekit configurations run through `modelmerge merge`: each shared method's translation equals the library call
with the same parameters on tiny models, and what cannot be translated is refused by name before any weight is read."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml
from conftest import make_llama_folders

from modelmerge.cli import main
from modelmerge.io import load_state_dict
from modelmerge.merge import dare, task_arithmetic, ties, weighted_average

warnings.filterwarnings("ignore", message=".*token_id.*")
TEXTS = [f"word{i % 7} word{(3 * i) % 11} end" for i in range(20)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_llama_folders(tmp_path_factory.mktemp("mergekit"), TEXTS, vocab_size=48)


def weights_of(folder):
    return load_state_dict(folder / "model.safetensors")


def run(folders, tmp_path, config: dict, capsys) -> dict:
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 0
    assert "translated mergekit" in capsys.readouterr().out
    return weights_of(tmp_path / "out")


CASES = {
    "linear": ({"models": [{"model": "math", "parameters": {"weight": 1.0}}, {"model": "code", "parameters": {"weight": 3.0}}]},
               lambda b, m: weighted_average(m, [1.0, 3.0])),
    "task_arithmetic": ({"base_model": "base", "parameters": {"lambda": 0.9},
                         "models": [{"model": "base"}, {"model": "math", "parameters": {"weight": 0.5}},
                                    {"model": "code", "parameters": {"weight": 0.8}}]},
                        lambda b, m: task_arithmetic(b, m, [0.9 * 0.5, 0.9 * 0.8])),
    "ties": ({"base_model": "base", "parameters": {"lambda": 0.8},
              "models": [{"model": "math", "parameters": {"weight": 1.0, "density": 0.3}},
                         {"model": "code", "parameters": {"weight": 2.0, "density": 0.6}}]},
             lambda b, m: ties(b, m, k=[0.3, 0.6], weights=[1.0, 2.0], lam=0.8, scope="tensor")),
    "dare_linear": ({"base_model": "base", "parameters": {"density": 0.7},
                     "models": [{"model": "math", "parameters": {"weight": 1.0}}, {"model": "code", "parameters": {"weight": 0.5}}]},
                    lambda b, m: task_arithmetic(b, dare(b, m, [0.3, 0.3], seed=0), [1.0, 0.5])),
    "dare_ties": ({"base_model": "base", "dtype": "bfloat16",
                   "models": [{"model": "math", "parameters": {"weight": 1.0, "density": 0.6}},
                              {"model": "code", "parameters": {"weight": 1.5, "density": 0.8}}]},
                  lambda b, m: ties(b, dare(b, m, [0.4, 0.2], seed=0), k=1.0, weights=[1.0, 1.5], normalize=False)),
}


@pytest.mark.parametrize("method", list(CASES))
def test_a_shared_mergekit_method_is_the_library_call_with_the_same_parameters(folders, tmp_path, capsys, method):
    config, library = CASES[method]
    config = {"merge_method": method, **{k: v for k, v in config.items()}}
    config["models"] = [{**e, "model": str(folders / e["model"])} for e in config["models"]]
    if "base_model" in config:
        config["base_model"] = str(folders / config["base_model"])
    merged = run(folders, tmp_path, config, capsys)
    base, models = weights_of(folders / "base"), [weights_of(folders / n) for n in ("math", "code")]
    expected = library(base, models)
    dtype = torch.bfloat16 if config.get("dtype") == "bfloat16" else torch.float32
    for name, value in merged.items():
        want = expected[name].to(dtype) if expected[name].is_floating_point() else expected[name]
        assert torch.equal(value, want), name
    assert merged["model.norm.weight"].dtype == dtype


@pytest.mark.parametrize(("change", "message"), [
    ({"slices": [{"sources": [{"model": "math", "layer_range": [0, 2]}]}]}, "mergekit slices: layer slices"),
    ({"merge_method": "slerp"}, "'slerp' has no counterpart"),
    ({"tokenizer_source": "union"}, "tokenizer merging"),
    ({"parameters": {"rescale": False}}, "rescale: false"),
    ({"models": [{"model": "math", "parameters": {"weight": [0.0, 0.5, 1.0], "density": 0.5}}]}, "per-layer gradient"),
    ({"models": [{"model": "math", "parameters": {"weight": 1.0, "epsilon": 0.1}}]}, "parameters.epsilon"),
    ({"models": [{"model": "math", "parameters": {"density": 0.5}}]}, "needs every model's weight"),
    ({"models": [{"model": "math", "parameters": {"weight": [{"filter": "mlp", "value": 1.0}], "density": 0.5}}]},
     "per-tensor filters"),
    ({"merge_method": "ties", "parameters": {"rescale": True}}, "L1 norm"),
])
def test_what_cannot_be_translated_is_refused_by_name_before_any_weight_is_read(tmp_path, capsys, change, message):
    config = {"merge_method": "dare_ties", "base_model": "missing-base/",  # nothing on disk: nothing is read first
              "models": [{"model": "missing-a/", "parameters": {"weight": 1.0, "density": 0.5}}], **change}
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 1
    assert message in capsys.readouterr().err
