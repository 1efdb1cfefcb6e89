# Steps 1 and 2: raw data to a processed dataset, then seeded problem files.


rule build_dataset:
    output:
        f"{RESULTS}/{{dataset}}/dataset/manifest.json",
    params:
        out_dir=lambda wildcards: dataset_dir(wildcards.dataset),
        settings=settings("{dataset}.build", "seed"),
    log:
        f"{RESULTS}/logs/build_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/build_dataset/{{dataset}}.tsv"
    script:
        "../scripts/build_dataset.py"


rule make_problems:
    input:
        manifest,
    output:
        f"{RESULTS}/{{dataset}}/problems/{{protocol}}.json",
    params:
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
        settings=settings("{dataset}.protocols.{protocol}", "seed"),
    log:
        f"{RESULTS}/logs/make_problems/{{dataset}}/{{protocol}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/make_problems/{{dataset}}/{{protocol}}.tsv"
    script:
        "../scripts/make_problems.py"
