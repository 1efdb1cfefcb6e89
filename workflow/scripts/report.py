"""Snakemake script of rule report."""

from s2m.pipeline.common import run_step
from s2m.pipeline.reporting import report_step

run_step(
    snakemake.log[0],
    report_step,
    snakemake.config,
    list(snakemake.input.tables),
    list(snakemake.input.histories),
    list(snakemake.input.models),
    snakemake.output[0],
)
