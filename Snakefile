# Set2Model benchmark workflow. Run from the repository root:
#   snakemake --cores all
# The config is config/config.yaml, validated against
# workflow/schemas/config.schema.yaml; --configfile merges a file on top of it.

from pathlib import Path

from snakemake.utils import min_version, validate

from s2m.config import reorder_like_defaults

min_version("8.0")


configfile: str(Path(workflow.basedir) / "config" / "config.yaml")


validate(config, "workflow/schemas/config.schema.yaml")
reorder_like_defaults(config)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        expand(f"{RESULTS}/tables/{{dataset}}.md", dataset=DATASETS),
        expand(f"{RESULTS}/figures/{{dataset}}_map_vs_noise.png", dataset=DATASETS),
        f"{RESULTS}/report.md",
    default_target: True
