"""Snakemake script of rule cache_backbone_features."""

from s2m.pipeline.backbone import cache_backbone_features_step
from s2m.pipeline.common import run_step

run_step(
    snakemake.log[0],
    cache_backbone_features_step,
    snakemake.config,
    snakemake.wildcards.dataset,
    snakemake.params.dataset_dir,
    snakemake.output[0],
    threads=snakemake.threads,
)
