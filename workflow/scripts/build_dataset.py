"""Snakemake script of rule build_dataset."""

from s2m.pipeline.common import run_step
from s2m.pipeline.data import build_dataset_step

run_step(
    snakemake.log[0],
    build_dataset_step,
    snakemake.config,
    snakemake.wildcards.dataset,
    snakemake.params.out_dir,
)
