"""Snakemake script of rule descriptors."""

from s2m.pipeline.common import run_step
from s2m.pipeline.training import descriptors_step

run_step(
    snakemake.log[0],
    descriptors_step,
    snakemake.config,
    snakemake.params.dataset_dir,
    snakemake.input.model,
    snakemake.output[0],
    features_path=snakemake.input.features or None,
    threads=snakemake.threads,
)
