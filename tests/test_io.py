"""Streaming merges from and to safetensors equal in-memory merges; bad inputs fail naming the parameter."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelmerge import (
    Identity,
    LazySafetensors,
    MergeInputError,
    SafetensorsWriter,
    fisher_average,
    gradient_matching,
    load_state_dict,
    save_state_dict,
    task_arithmetic,
    task_removal,
)
from modelmerge.io import atomic_write_text


def write_all(tmp_path, base, tasks, fishers):
    save_state_dict(base, tmp_path / "base.safetensors")
    for i, (t, f) in enumerate(zip(tasks, fishers)):
        save_state_dict(t, tmp_path / f"task{i}.safetensors")
        save_state_dict(f, tmp_path / f"fisher{i}.safetensors", metadata={"estimator": "test"})


def test_writer_output_is_read_by_the_official_library(tmp_path, models):
    base, _ = models
    mixed = {**base, "step": torch.tensor([3, 1], dtype=torch.int64), "half": torch.ones(2, 2, dtype=torch.bfloat16)}
    save_state_dict(mixed, tmp_path / "m.safetensors", metadata={"k": "v"})
    loaded = load_file(tmp_path / "m.safetensors")
    assert set(loaded) == set(mixed)
    for k in mixed:
        assert torch.equal(loaded[k], mixed[k]) and loaded[k].dtype == mixed[k].dtype
    assert LazySafetensors(tmp_path / "m.safetensors").metadata() == {"k": "v"}


def test_writer_is_byte_identical_to_safetensors_save_file(tmp_path, models):
    base, _ = models
    save_state_dict(base, tmp_path / "ours.safetensors")
    save_file(base, tmp_path / "theirs.safetensors")
    assert load_state_dict(tmp_path / "ours.safetensors").keys() == load_file(tmp_path / "theirs.safetensors").keys()
    # same tensors, same order, same bytes after the header
    ours, theirs = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "theirs.safetensors").read_bytes()
    n_ours, n_theirs = (int.from_bytes(b[:8], "little") for b in (ours, theirs))
    assert ours[8 + n_ours :] == theirs[8 + n_theirs :]
    # and our reader reads the official writer's file
    mixed = {**base, "half": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "empty": torch.zeros(0, 3)}
    save_file(mixed, tmp_path / "mixed.safetensors", metadata={"a": "b"})
    back = LazySafetensors(tmp_path / "mixed.safetensors")
    assert back.metadata() == {"a": "b"} and back.info("half") == (torch.bfloat16, (2, 3))
    assert all(torch.equal(back[k], mixed[k]) and back[k].dtype == mixed[k].dtype for k in mixed)


def test_streamed_merges_equal_in_memory_merges(tmp_path, models, fishers):
    base, tasks = models
    write_all(tmp_path, base, tasks, fishers)
    lazy_base = LazySafetensors(tmp_path / "base.safetensors")
    lazy_tasks = [LazySafetensors(tmp_path / f"task{i}.safetensors") for i in range(3)]
    lazy_f = [LazySafetensors(tmp_path / f"fisher{i}.safetensors") for i in range(3)]
    cases = [
        (lambda b, ts, fs, out: task_arithmetic(b, ts, [0.3, 0.5, 0.7], out=out)),
        (lambda b, ts, fs, out: fisher_average(ts, fs, delta=1e-8, out=out)),
        (lambda b, ts, fs, out: gradient_matching(b, ts, fs, Identity(), alphas=0.8, out=out)),
        (lambda b, ts, fs, out: task_removal(b, ts[0], fs[1], Identity(), fs[0], alpha=0.5, out=out)),
    ]
    for i, merge in enumerate(cases):
        in_memory = merge(base, tasks, fishers, None)
        with SafetensorsWriter.like(lazy_base, tmp_path / f"merged{i}.safetensors") as out:
            merge(lazy_base, lazy_tasks, lazy_f, out)
        streamed = load_state_dict(tmp_path / f"merged{i}.safetensors")
        assert streamed.keys() == in_memory.keys()
        for k in in_memory:
            assert torch.equal(streamed[k], in_memory[k]), (i, k)


def test_failed_streaming_merge_leaves_no_file(tmp_path, models):
    base, tasks = models
    bad = dict(tasks[1])
    bad["head.weight"] = bad["head.weight"].clone()
    bad["head.weight"][0, 0] = float("nan")
    with pytest.raises(MergeInputError, match="head.weight"):
        with SafetensorsWriter.like(base, tmp_path / "out.safetensors") as out:
            task_arithmetic(base, [tasks[0], bad], out=out)
    assert os.listdir(tmp_path) == []


def test_writer_refuses_incomplete_or_mismatched_output(tmp_path, models):
    base, _ = models
    writer = SafetensorsWriter.like(base, tmp_path / "x.safetensors")
    with pytest.raises(MergeInputError, match="encoder.bias"):
        writer["encoder.bias"] = torch.zeros(5, dtype=torch.float64)
    writer["encoder.bias"] = base["encoder.bias"]
    with pytest.raises(MergeInputError, match="never written"):
        writer.close()
    assert os.listdir(tmp_path) == []


def test_atomic_write_replaces_whole_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    atomic_write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def _corrupt(kind: str, base, tasks):
    t = {k: v.clone() for k, v in tasks[1].items()}
    if kind == "missing key":
        del t["encoder.bias"]
    elif kind == "shape mismatch":
        t["encoder.bias"] = torch.zeros(5, dtype=torch.float64)
    elif kind == "NaN":
        t["encoder.bias"][2] = float("nan")
    elif kind == "dtype mismatch":
        t["encoder.bias"] = t["encoder.bias"].float()
    elif kind == "extra key":
        t["decoder.bias"] = torch.zeros(2, dtype=torch.float64)
        return "decoder.bias", t
    return "encoder.bias", t


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing key", "missing from model 1"),
        ("shape mismatch", "shape mismatch"),
        ("NaN", "non-finite"),
        ("dtype mismatch", "dtype mismatch"),
        ("extra key", "base model does not"),
    ],
)
def test_bad_models_raise_naming_the_parameter(models, kind, message):
    base, tasks = models
    name, bad = _corrupt(kind, base, tasks)
    for merge in (
        lambda: task_arithmetic(base, [tasks[0], bad]),
        lambda: gradient_matching(base, [tasks[0], bad], [Identity(), Identity()], Identity()),
    ):
        with pytest.raises(MergeInputError, match=message) as err:
            merge()
        assert err.value.parameter == name
        assert repr(name) in str(err.value)


def test_negative_curvature_raises_naming_the_parameter(models, fishers):
    base, tasks = models
    bad = [dict(f) for f in fishers]
    bad[2]["head.weight"] = -bad[2]["head.weight"]
    with pytest.raises(MergeInputError, match="'head.weight'.*negative") as err:
        gradient_matching(base, tasks, bad, Identity())
    assert err.value.parameter == "head.weight"
    with pytest.raises(MergeInputError, match="'head.weight'.*negative"):
        fisher_average(tasks, bad)


def test_integer_buffers_are_copied_and_must_agree(models):
    base, tasks = models
    ids = torch.arange(4)
    merged = task_arithmetic({**base, "ids": ids}, [{**t, "ids": ids} for t in tasks])
    assert torch.equal(merged["ids"], ids)
    with pytest.raises(MergeInputError, match="'ids'.*differs"):
        task_arithmetic({**base, "ids": ids}, [{**t, "ids": ids + 1} for t in tasks])


def _cut(path, size):
    path.write_bytes(path.read_bytes()[:size])


def test_a_damaged_file_is_refused_by_name_before_any_tensor_is_read(tmp_path, models):
    import json
    import struct

    from modelmerge.files import CorruptFileError, check_safetensors
    from modelmerge.heads import LinearHead
    from modelmerge.io import LazySafetensors

    base, _ = models
    good = tmp_path / "good.safetensors"
    save_state_dict(base, good)
    (n,) = struct.unpack("<Q", good.read_bytes()[:8])
    size = good.stat().st_size
    data = size - 8 - n  # the tensors' bytes: the header's largest end offset
    assert data == max(v["data_offsets"][1] for k, v in json.loads(good.read_bytes()[8:8 + n]).items()
                       if k != "__metadata__")
    cases = {  # name -> (how the file is damaged, what the message says)
        "tensors cut": (lambda p: _cut(p, size - 1), f"truncated ({size - 1} bytes, its header describes {size})"),
        "header cut": (lambda p: _cut(p, 8 + n // 2), "truncated inside its header"),
        "too short": (lambda p: _cut(p, 5), "5 bytes, too short"),
        "appended": (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "longer than its header says"),
        "not json": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[" + b"\0" * 8), "header is not JSON"),
    }
    for name, (damage, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        bad.write_bytes(good.read_bytes())
        damage(bad)
        for read in (LazySafetensors, load_state_dict, check_safetensors, lambda p: check_safetensors(p.parent)):
            with pytest.raises(CorruptFileError, match=re.escape(str(bad)) + ".*" + re.escape(message)):
                read(bad)
        bad.unlink()  # the folder check reads every file in the folder
    head = tmp_path / "heads" / "task.safetensors"
    LinearHead(torch.ones(2, 3), torch.zeros(2), 1.0, ["a", "b"]).save(head)
    _cut(head, head.stat().st_size - 4)
    with pytest.raises(CorruptFileError, match="task.safetensors: truncated"):
        LinearHead.load(head)
    assert load_state_dict(good).keys() == base.keys()  # an intact file still reads


def test_what_the_workflow_imports_while_parsing_does_not_import_torch():
    # Snakemake parses the workflow in every run and dry run: the helpers it imports stay light (a speed guard,
    # stated as the imports it implies, not as a time)
    import subprocess
    import sys

    code = ("import sys, modelmerge, modelmerge.data.suite, modelmerge.experiments.sentiment, modelmerge.files; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules); "
            "assert not heavy, heavy; from modelmerge import average; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
