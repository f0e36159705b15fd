"""`modelmerge merge` and `modelmerge curvature` on tiny Hugging Face folders: the README's recipe gives the
library's own merge, and every bad input stops with a message that names the field, model or parameter."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import make_llama_folders

from modelmerge.cli import main
from modelmerge.models import tiny_model, train_tokenizer
from modelmerge.recipe import METHODS, RecipeError, method_parameters, validate_recipe

warnings.filterwarnings("ignore", message=".*token_id.*")
ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"word{i % 7} word{(3 * i) % 11} word{(5 * i) % 13} end" for i in range(40)]


def readme_recipe() -> str:
    """The example recipe of the README's "Merge your own models" section."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- recipe-example -->\s*```yaml\n(.*?)```", text, re.S)
    assert block, "the README's example recipe (after <!-- recipe-example -->) is missing"
    return block.group(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base/, math/, code/ (tiny llamas: the base plus a seeded task vector each) and their data files."""
    root = make_llama_folders(tmp_path_factory.mktemp("models"), TEXTS)
    pd.DataFrame({"text": TEXTS[:20]}).to_csv(root / "math.csv", index=False)
    pd.DataFrame({"text": TEXTS[20:]}).to_csv(root / "code.csv", index=False)
    return root


def test_the_readme_recipe_writes_a_loadable_folder_equal_to_the_library_merge(folders, tmp_path, capsys):
    import transformers

    from modelmerge.curvature import Scalar
    from modelmerge.curvature.estimate import diagonal_fisher
    from modelmerge.merge import gradient_matching
    from modelmerge.train import text_batches

    text = readme_recipe()
    (folders / "recipe.yaml").write_text(text)
    recipe = yaml.safe_load(text)
    out = tmp_path / "merged"
    assert main(["merge", str(folders / "recipe.yaml"), str(out), "--dry-run"]) == 0 and not out.exists()
    assert main(["merge", str(folders / "recipe.yaml"), str(out)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "recipe.yaml"} <= {p.name for p in out.iterdir()}
    assert "gradient_matching" in (out / "README.md").read_text() and (out / "recipe.yaml").read_text() == text
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()

    # the same merge through the library: Fishers of each model on its data, H_0 = c I, Eq. 12
    cfg = recipe["curvature"]
    load = transformers.AutoModelForCausalLM.from_pretrained
    tok = transformers.AutoTokenizer.from_pretrained(folders / "base")
    base = load(folders / "base").state_dict()
    models, fishers = [], []
    for entry in recipe["models"]:
        model = load(folders / entry["model"])
        texts = pd.read_csv(folders / entry["data"])["text"].tolist()
        batches = text_batches(tok, texts, None, cfg.get("batch_size", 8), cfg["max_length"], task="causal_lm",
                               by_length=True)
        fishers.append(diagonal_fisher(model, batches, task="causal_lm", progress=False, device="cpu").sum())
        models.append(model.state_dict())
    names = [k for k in base if k != "lm_head.weight"]  # tied to the embeddings: saved once
    expected = gradient_matching({k: base[k] for k in names}, [{k: m[k] for k in names} for m in models], fishers,
                                 Scalar(cfg["base"]), alphas=recipe["parameters"]["alphas"])
    for k in names:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged["model.norm.weight"], base["model.norm.weight"])


def test_curvature_command_files_reused_by_fisher_averaging_and_regmean_with_their_scales(folders, tmp_path):
    from modelmerge.curvature import Gram
    from modelmerge.curvature.estimate import DiagonalFisher, LayerFactors
    from modelmerge.io import load_state_dict
    from modelmerge.merge import fisher_average, regmean

    paths = {}
    for name, n in (("math", 20), ("code", 20)):
        for kind in ("fisher", "gram"):
            paths[name, kind] = tmp_path / f"{name}.{kind}.safetensors"
            argv = ["curvature", str(folders / name), str(folders / f"{name}.csv"), str(paths[name, kind]),
                    "--kind", kind, "--max-length", "16", "--examples", str(n if name == "math" else 12)]
            assert main(argv) == 0
    fishers = {m: DiagonalFisher.load(paths[m, "fisher"]) for m in ("math", "code")}
    assert (fishers["math"].n, fishers["code"].n) == (20, 12)  # different N: F_sum and F_avg weigh differently
    models = [load_state_dict(folders / m / "model.safetensors") for m in ("math", "code")]

    fa = {"method": "fisher_average", "base": "base", "parameters": {"delta": 1e-6},
          "curvature": {"scale": "mean"},
          "models": [{"model": m, "curvature": str(paths[m, "fisher"])} for m in ("math", "code")]}
    (folders / "fa.yaml").write_text(yaml.safe_dump(fa))
    assert main(["merge", str(folders / "fa.yaml"), str(tmp_path / "fa")]) == 0
    expected = fisher_average(models, [fishers[m].mean() for m in ("math", "code")], delta=1e-6)
    merged = load_state_dict(tmp_path / "fa" / "model.safetensors")
    for k in models[0]:
        torch.testing.assert_close(merged[k], expected[k])

    # RegMean: Grams (scale sum: Z^T Z, RegMean's own objective) on the linear weights, the diagonal Fisher elsewhere
    rm = {"method": "regmean", "base": "base", "parameters": {"offdiag_scale": 0.9},
          "models": [{"model": m, "curvature": [str(paths[m, "gram"]), str(paths[m, "fisher"])]} for m in ("math", "code")]}
    (folders / "rm.yaml").write_text(yaml.safe_dump(rm))
    assert main(["merge", str(folders / "rm.yaml"), str(tmp_path / "rm")]) == 0
    grams = []
    for m in ("math", "code"):
        f = LayerFactors.load(paths[m, "gram"])
        grams.append({k: Gram(a * f.n, f.in_axis[k]) for k, a in f.A.items()})
    expected = regmean(models, grams, offdiag_scale=0.9, fallback=[fishers[m].sum() for m in ("math", "code")])
    merged = load_state_dict(tmp_path / "rm" / "model.safetensors")
    for k in models[0]:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preconditioner", ["none", "kronecker"])
def test_gradient_matching_with_kfac_estimated_on_the_fly_is_the_library_cg_solve(folders, tmp_path, preconditioner):
    from modelmerge.curvature import Scalar, WithFallback
    from modelmerge.curvature.estimate import DiagonalFisher, LayerFactors, fisher_and_kfac
    from modelmerge.io import load_state_dict
    from modelmerge.merge import gradient_matching
    from modelmerge.solve import ConjugateGradient

    recipe = {"method": "gradient_matching", "base": "base", "parameters": {"alphas": [1.0, 0.5], "cg_iterations": 30,
                                                                        "cg_preconditioner": preconditioner},
              "curvature": {"kind": "kfac", "base": "1e-3", "max_length": 16},  # "1e-3": how YAML reads 1e-3
              "models": [{"model": m, "data": f"{m}.csv"} for m in ("math", "code")]}
    (folders / "gm.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "gm"
    assert main(["merge", str(folders / "gm.yaml"), str(out)]) == 0
    specs = []
    for i, m in enumerate(("math", "code")):  # the folder keeps what it estimated: K-FAC and, for the rest, the Fisher
        kfac = LayerFactors.load(out / "curvature" / f"models_{i}.kfac.safetensors")
        fisher = DiagonalFisher.load(out / "curvature" / f"models_{i}.fisher.safetensors")
        specs.append(WithFallback({k: h.scale(kfac.n) for k, h in kfac.curvature().items()}, fisher.sum()))
    models = [load_state_dict(folders / m / "model.safetensors") for m in ("math", "code")]
    base = load_state_dict(folders / "base" / "model.safetensors")
    expected = gradient_matching(base, models, specs, Scalar(1e-3), alphas=[1.0, 0.5],
                                 solver=ConjugateGradient(max_iter=30, preconditioner=preconditioner))
    merged = load_state_dict(out / "model.safetensors")
    for k in base:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)
    # and those files are the estimator's: one pass of fisher_and_kfac on the same texts
    import transformers

    from modelmerge.train import text_batches

    tok = transformers.AutoTokenizer.from_pretrained(folders / "math")
    texts = pd.read_csv(folders / "math.csv")["text"].tolist()
    f, k = fisher_and_kfac(transformers.AutoModelForCausalLM.from_pretrained(folders / "math"),
                           text_batches(tok, texts, None, 8, 16, task="causal_lm", by_length=True),
                           task="causal_lm", device="cpu", progress=False)
    saved = LayerFactors.load(out / "curvature" / "models_0.kfac.safetensors")
    for name in k.A:
        torch.testing.assert_close(saved.B[name], k.B[name])
    assert torch.equal(DiagonalFisher.load(out / "curvature" / "models_0.fisher.safetensors").f_sum["model.norm.weight"],
                       f.f_sum["model.norm.weight"])


def bad(folders, tmp_path, capsys, recipe: dict, match: str) -> None:
    """The recipe fails with a message matching ``match``, and leaves neither OUT_DIR nor a temporary folder."""
    path = folders / f"bad_{abs(hash(str(recipe)))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    assert main(["merge", str(path), str(out)]) == 1
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert set(tmp_path.iterdir()) == before  # nothing written, nothing left over


def test_every_bad_input_is_refused_by_name_and_leaves_nothing(folders, tmp_path, capsys):
    ta = {"method": "task_arithmetic", "base": "base", "models": ["math", "code"]}
    bad(folders, tmp_path, capsys, {**ta, "method": "frankenmerge"}, r"method: unknown method 'frankenmerge'")
    bad(folders, tmp_path, capsys, {**ta, "models": ["math", "nowhere"]}, r"models\[1\]: no model folder")
    bad(folders, tmp_path, capsys, {**ta, "parameters": {"alphas": [1.0, 1.0, 1.0]}},
        r"parameters.alphas: 3 values for 2 models")
    bad(folders, tmp_path, capsys, {**ta, "parameters": {"k": 0.2}}, r"parameters.k: not a parameter of task_arithmetic")
    bad(folders, tmp_path, capsys, {**ta, "method": "ties", "parameters": {"k": "most"}}, r"parameters.k: ")
    bad(folders, tmp_path, capsys, {**ta, "parameters": {"alphas": 1e39}, "models": ["math", "math", "code"]},
        r"merged tensor is not finite")
    bad(folders, tmp_path, capsys, {"method": "ties", "models": ["math"]}, r"base: ties .*needs the base model")
    bad(folders, tmp_path, capsys, {**ta, "modles": []}, r"modles: Extra inputs are not permitted")
    bad(folders, tmp_path, capsys, {"method": "gradient_matching", "base": "base", "curvature": {"base": 1.0},
                                    "models": [{"model": "math", "data": "math.csv"}, "code"]},
        r"models\[1\]: gradient_matching needs this model's curvature")

    # another architecture, and curvature estimated on another model
    tok = train_tokenizer(TEXTS, vocab_size=64)
    gpt2 = tiny_model("gpt2", tok.vocab_size, task="causal_lm")
    gpt2.save_pretrained(folders / "gpt2", safe_serialization=True)
    tok.save_pretrained(folders / "gpt2")
    bad(folders, tmp_path, capsys, {**ta, "models": ["math", "gpt2"]}, r"models\[1\]: architecture .*GPT2.* differs")
    wrong = folders / "gpt2.fisher.safetensors"
    assert main(["curvature", str(folders / "gpt2"), str(folders / "code.csv"), str(wrong), "--max-length", "16"]) == 0
    fa = {"method": "fisher_average", "base": "base",
          "models": [{"model": "math", "curvature": "gpt2.fisher.safetensors"}, {"model": "code", "data": "code.csv"}]}
    bad(folders, tmp_path, capsys, fa, r"models\[0\].curvature: gpt2.fisher.safetensors has no Fisher for parameter")
    kfac = folders / "math.kfac.safetensors"
    assert main(["curvature", str(folders / "math"), str(folders / "math.csv"), str(kfac), "--kind", "kfac",
                 "--max-length", "16"]) == 0
    bad(folders, tmp_path, capsys, {**fa, "models": [{"model": "math", "curvature": "math.kfac.safetensors"}, fa["models"][1]]},
        r"models\[0\].curvature: fisher_average needs a curvature for every parameter, and kfac factors cover only")
    bad(folders, tmp_path, capsys, {**ta, "curvature": {"kind": "fisher"}}, r"curvature: task_arithmetic uses no curvature")
    bad(folders, tmp_path, capsys, {**fa, "models": [{"model": "math", "data": "math.csv"}], "curvature": {"column": "body"}},
        r"models\[0\].data: math.csv has no column 'body' \(it has text\)")
    # same names, other shapes: a llama with a larger vocabulary
    big = tiny_model("llama", tok.vocab_size + 8, task="causal_lm")
    big.save_pretrained(folders / "big", safe_serialization=True)
    tok.save_pretrained(folders / "big")
    shaped = folders / "big.fisher.safetensors"
    assert main(["curvature", str(folders / "big"), str(folders / "code.csv"), str(shaped), "--max-length", "16"]) == 0
    fa["models"][0]["curvature"] = "big.fisher.safetensors"
    bad(folders, tmp_path, capsys, fa, r"big.fisher.safetensors has shape \(\d+, 32\) for parameter 'model.embed_tokens.weight', the model \(\d+, 32\)")


def test_recipe_parameters_are_the_library_signatures():
    # the CLI cannot drift from the library: each method's parameters are its function's keyword arguments
    assert set(method_parameters("ties")) == {"k", "lam", "scope", "weights", "normalize"}
    assert set(method_parameters("gradient_matching")) == {"alphas", "delta", "cg_iterations", "cg_preconditioner"}
    assert set(method_parameters("regmean")) == {"offdiag_scale"}
    assert method_parameters("ties")["k"][1] == 0.2  # the library's default
    for name in METHODS:
        method_parameters(name)  # every signature's hints resolve
    recipe, params = validate_recipe({"method": "ties", "base": "b", "models": ["m"], "parameters": {"k": 0.5}})
    assert params.k == 0.5 and params.lam == 1.0 and params.scope == "model"
    with pytest.raises(RecipeError, match="models: List should have at least 1 item"):
        validate_recipe({"method": "ties", "base": "b", "models": []})


def test_dpp_selection_skips_a_duplicate_and_merges_the_chosen_models_with_their_alphas(folders, tmp_path, capsys):
    # models[0] and models[1] are the same model: any subset holding both has det(L_Y) = 0 (S_01 = 1), and with
    # equal similarity to models[2] the better of the two (higher quality) wins: 003's quality-diversity trade
    import shutil

    from modelmerge.io import load_state_dict
    from modelmerge.merge import task_arithmetic

    if not (folders / "math_copy").exists():
        shutil.copytree(folders / "math", folders / "math_copy")
    recipe = {"method": "task_arithmetic", "base": "base", "models": ["math", "math_copy", "code"],
              "parameters": {"alphas": [0.3, 0.5, 0.7]},
              "select": {"k": 2, "quality": [0.8, 0.9, 0.85], "base_quality": 0.7, "data": "code.csv",
                         "max_length": 16}}
    (folders / "dpp.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "dpp"
    assert main(["merge", str(folders / "dpp.yaml"), str(out)]) == 0
    assert "DPP selected models[1], models[2]" in capsys.readouterr().out
    base, copy, code = (load_state_dict(folders / n / "model.safetensors") for n in ("base", "math_copy", "code"))
    expected = task_arithmetic(base, [copy, code], [0.5, 0.7])
    merged = load_state_dict(out / "model.safetensors")
    for k in base:
        torch.testing.assert_close(merged[k], expected[k])
    bad(folders, tmp_path, capsys, {**recipe, "select": {**recipe["select"], "quality": [0.8, 0.9]}},
        r"select.quality: 2 values for 3 models")


def test_hub_names_are_downloaded_and_an_unreachable_hub_is_a_clear_error(folders, tmp_path, capsys, monkeypatch):
    # the hub loader is real (huggingface_hub.snapshot_download); here it is served by a local fixture
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns)))
        if repo_id == "someone/missing":
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return str(folders / repo_id.split("/")[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    recipe = {"method": "task_arithmetic", "base": "hub-org/base", "models": ["hub-org/math", "code"]}
    (folders / "hub.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(folders / "hub.yaml"), str(tmp_path / "hub"), "--dry-run"]) == 0
    assert [c[0] for c in calls] == ["hub-org/base", "hub-org/math"] and "*.safetensors" in calls[0][1]
    bad(folders, tmp_path, capsys, {**recipe, "models": ["someone/missing"]},
        r"models\[0\]: 'someone/missing' is not a local path and the hub could not provide it \(OSError")


def test_shards_are_cut_as_save_pretrained_cuts_and_a_tensor_larger_than_a_shard_is_refused():
    from modelmerge.io import shard_names
    from modelmerge.statedict import MergeInputError

    f32 = torch.float32
    layout = {"a": (f32, (10,)), "b": (f32, (5,)), "c": (f32, (20,)), "d": (f32, (1,)), "e": (f32, (4,))}  # 40 20 80 4 16 bytes
    assert shard_names(layout, 80) == [["a", "b"], ["c"], ["d", "e"]]  # a new shard when the next would not fit
    assert shard_names(layout, 10**9) == [list(layout)]
    with pytest.raises(MergeInputError, match="'c'.*larger than the shard size"):
        shard_names(layout, 79)


def test_a_sharded_writer_round_trips_through_its_index(tmp_path):
    import json

    from modelmerge.io import ShardedSafetensorsWriter
    from modelmerge.recipe import ShardedSafetensors

    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(8, 8, generator=gen) for i in range(5)} | {"step": torch.tensor([3])}
    with ShardedSafetensorsWriter.like(state, tmp_path, max_shard_size=600, metadata={"format": "pt"}) as w:
        for k in reversed(list(state)):  # any order
            w[k] = state[k]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    # 256 bytes per weight, 8 for the step: two weights per 600-byte shard, the step beside the last weight
    assert w.files == [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]
    assert index["weight_map"]["step"] == index["weight_map"]["layer4.weight"] == w.files[-1]
    assert index["metadata"]["total_size"] == 5 * 256 + 8 and set(index["weight_map"]) == set(state)
    back = ShardedSafetensors(tmp_path / "model.safetensors.index.json")
    assert all(torch.equal(back[k], v) for k, v in state.items())
    from modelmerge.merge.fast import MappedSafetensors, _sources

    mapped = ShardedSafetensors(tmp_path / "model.safetensors.index.json", reader=MappedSafetensors)
    assert len(_sources(mapped)) == 3 and all(torch.equal(mapped[k], v) for k, v in state.items())  # pages it releases
    one = tmp_path / "one"
    one.mkdir()
    with ShardedSafetensorsWriter.like(state, one) as w:  # fits the default: one file, no index
        for k, v in state.items():
            w[k] = v
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]
    partial = tmp_path / "partial"
    partial.mkdir()
    with pytest.raises(Exception, match="never written"), ShardedSafetensorsWriter.like(state, partial, 600) as w:
        w["step"] = state["step"]
    assert not any(p.suffix == ".json" for p in partial.iterdir())


def test_a_sharded_merge_loads_with_from_pretrained_and_equals_the_unsharded_one(folders, tmp_path, capsys):
    import transformers

    recipe = folders / "ta.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": "base", "models": ["math", "code"],
                                      "parameters": {"alphas": 0.7}}))
    assert main(["merge", str(recipe), str(tmp_path / "one")]) == 0
    assert main(["merge", str(recipe), str(tmp_path / "sharded"), "--shard-size", "20KB"]) == 0
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.startswith("model-") for f in files) > 2
    one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    sharded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)
    # a sharded folder is read back as an input, and a shard size below the largest tensor stops the dry run
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": "base", "models": [str(tmp_path / "sharded")]}))
    assert main(["merge", str(recipe), str(tmp_path / "again"), "--dry-run"]) == 0
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "small"), "--dry-run", "--shard-size", "1KB"]) == 1
    err = capsys.readouterr().err
    assert "--shard-size" in err and "larger than the shard size 1,000" in err and not (tmp_path / "small").exists()


@pytest.mark.parametrize("damage", ["missing shard", "mismatched shard"])
def test_a_shard_index_pointing_at_a_missing_or_mismatched_shard_is_named(folders, tmp_path, capsys, damage):
    import json
    import shutil

    recipe = folders / "ta.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": "base", "models": ["math"]}))
    assert main(["merge", str(recipe), str(tmp_path / "sharded"), "--shard-size", "20KB"]) == 0
    model = tmp_path / "sharded"
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    if damage == "missing shard":
        (model / shard).unlink()
    else:
        name = next(k for k, f in index["weight_map"].items() if f != shard)
        index["weight_map"][name] = shard
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copytree(folders / "base", tmp_path / "base")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": "base", "models": ["sharded"]}))
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert shard in err and ("not in" in err if damage == "missing shard" else "mismatched" in err)


@pytest.mark.parametrize("recipe", [
    {"method": "task_arithmetic", "base": "base", "models": ["math", "code"], "parameters": {"alphas": [0.6, 0.9]}},
    {"method": "ties", "base": "base", "models": ["math", "code"], "parameters": {"k": 0.3}, "dare": {"p": 0.3}},
    {"method": "weighted_average", "base": "base", "models": ["base", "math", "code"], "parameters": {"weights": [1, 2, 3]}},
], ids=["task_arithmetic", "dare+ties", "weighted_average"])
def test_the_commands_fast_path_writes_the_reference_drivers_bytes(folders, tmp_path, recipe):
    path = folders / f"fast_{recipe['method']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), str(tmp_path / "fast"), "--shard-size", "30KB"]) == 0
    assert main(["merge", str(path), str(tmp_path / "reference"), "--shard-size", "30KB", "--reference"]) == 0
    shards = sorted(p.name for p in (tmp_path / "fast").glob("model*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "reference").glob("model*.safetensors"))
    for name in shards:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
