"""Snakemake script of rule make_problems."""

from s2m.pipeline.common import run_step
from s2m.pipeline.data import make_problems_step

run_step(
    snakemake.log[0],
    make_problems_step,
    snakemake.config,
    snakemake.wildcards.dataset,
    snakemake.params.dataset_dir,
    snakemake.wildcards.protocol,
    snakemake.output[0],
)
