"""Snakemake script of rule table."""

from s2m.pipeline.common import run_step
from s2m.pipeline.reporting import table_step

run_step(
    snakemake.log[0],
    table_step,
    snakemake.config,
    snakemake.wildcards.dataset,
    list(snakemake.input),
    snakemake.output.csv,
    snakemake.output.markdown,
    snakemake.output.figure,
)
