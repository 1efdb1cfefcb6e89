"""Snakemake script of rule pretrain."""

from s2m.pipeline.common import run_step
from s2m.pipeline.training import pretrain_step

run_step(
    snakemake.log[0],
    pretrain_step,
    snakemake.config,
    snakemake.wildcards.dataset,
    snakemake.params.dataset_dir,
    snakemake.output[0],
    features_path=snakemake.input.features or None,
    threads=snakemake.threads,
)
