# Step 5: tables, figures and the report.


rule table:
    input:
        lambda wildcards: expand(
            f"{RESULTS}/{wildcards.dataset}/aps/{{method}}.csv",
            method=METHODS,
        ),
    output:
        csv=f"{RESULTS}/tables/{{dataset}}.csv",
        markdown=f"{RESULTS}/tables/{{dataset}}.md",
        figure=f"{RESULTS}/figures/{{dataset}}_map_vs_noise.png",
    params:
        settings=settings("evaluation", "baselines", "meta_trained", "{dataset}.protocols", labels=True),
        code=CODE_VERSION,
    log:
        f"{RESULTS}/logs/table/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/table/{{dataset}}.tsv"
    script:
        "../scripts/table.py"


rule report:
    input:
        tables=expand(f"{RESULTS}/tables/{{dataset}}.md", dataset=DATASETS),
        histories=expand(
            f"{RESULTS}/{{dataset}}/models/{{variant}}_history.csv",
            dataset=DATASETS,
            variant=VARIANTS,
        ),
        models=expand(
            f"{RESULTS}/{{dataset}}/models/{{embedding}}.pt",
            dataset=DATASETS,
            embedding=["pretrained", *VARIANTS],
        ),
    output:
        f"{RESULTS}/report.md",
    params:
        code=CODE_VERSION,
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    script:
        "../scripts/report.py"
