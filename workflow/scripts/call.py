"""Snakemake script: one library call per job, ``params.function`` ("module:name") with ``params.kwargs``.

The rule's ``threads`` are passed when the function takes them; the text the function returns (a summary) is
the job's log. A script job starts a plain Python process, not a second Snakemake that parses the whole workflow
(what a ``run:`` block costs), so small jobs stay small.
"""

import importlib
import inspect
import json

from modelmerge.files import atomic_write_text

sm = snakemake  # noqa: F821  (the job's inputs, outputs, params, threads and log, set by Snakemake)
module, name = sm.params.function.split(":")
function = getattr(importlib.import_module(module), name)
kwargs = dict(sm.params.kwargs)
if "threads" in inspect.signature(function).parameters:
    kwargs["threads"] = sm.threads
summary = function(**kwargs)
if not isinstance(summary, str):
    summary = f"{sm.params.function}(**{json.dumps(kwargs, sort_keys=True, default=str)})"
atomic_write_text(sm.log[0], summary + "\n")
