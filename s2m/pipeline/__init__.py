"""Steps of the benchmark, one function per Snakemake rule.

Each step reads the validated config and explicit paths, and calls the
library. The Snakemake scripts in ``workflow/scripts`` are one-line calls of
these functions, which also run without Snakemake.
"""
