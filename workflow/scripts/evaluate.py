"""Snakemake script of rule evaluate."""

from s2m.pipeline.common import run_step
from s2m.pipeline.evaluation import evaluate_step

run_step(
    snakemake.log[0],
    evaluate_step,
    snakemake.config,
    snakemake.wildcards.dataset,
    snakemake.wildcards.method,
    snakemake.params.dataset_dir,
    snakemake.input.descriptors,
    list(snakemake.input.problems),
    snakemake.output[0],
)
