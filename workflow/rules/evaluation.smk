# Step 4: each method to per-concept average precisions, for every protocol of a dataset.


rule evaluate:
    input:
        manifest=manifest,
        descriptors=lambda wildcards: f"{RESULTS}/{wildcards.dataset}/descriptors/{method_embedding(wildcards.method)}.npy",
        problems=lambda wildcards: expand(
            f"{RESULTS}/{wildcards.dataset}/problems/{{protocol}}.json",
            protocol=protocols(wildcards.dataset),
        ),
        code=baseline_source,
    output:
        f"{RESULTS}/{{dataset}}/aps/{{method}}.csv",
    params:
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
        settings=settings(
            "baselines.{method}", "meta_trained.{method}", lambda wildcards: uses_mixture(wildcards.method), "seed"
        ),
    threads: 1
    log:
        f"{RESULTS}/logs/evaluate/{{dataset}}/{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{dataset}}/{{method}}.tsv"
    script:
        "../scripts/evaluate.py"
