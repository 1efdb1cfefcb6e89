"""Snakemake script of rule meta_train."""

from s2m.pipeline.common import run_step
from s2m.pipeline.training import meta_train_step

run_step(
    snakemake.log[0],
    meta_train_step,
    snakemake.config,
    snakemake.wildcards.dataset,
    snakemake.wildcards.variant,
    snakemake.params.dataset_dir,
    snakemake.input.pretrained,
    snakemake.output.model,
    snakemake.output.history,
    features_path=snakemake.input.features or None,
    threads=snakemake.threads,
)
