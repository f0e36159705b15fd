"""Snakemake script (rule library_digest): one line "sha256  path" per source file of the library."""

from modelmerge.assets import sha256_of
from modelmerge.files import atomic_write_text

sm = snakemake  # noqa: F821  (set by Snakemake)
atomic_write_text(sm.output[0], "".join(f"{sha256_of(path)}  {path}\n" for path in sm.input))
