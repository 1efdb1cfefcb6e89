# Step 4: each method to per-concept average precisions.


rule evaluate:
    input:
        manifest=manifest,
        descriptors=lambda wildcards: f"{RESULTS}/{wildcards.dataset}/descriptors/{method_embedding(wildcards.method)}.npy",
        problems=f"{RESULTS}/{{dataset}}/problems/{{protocol}}.json",
    output:
        f"{RESULTS}/{{dataset}}/aps/{{method}}/{{protocol}}.csv",
    params:
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
    threads: 1
    log:
        f"{RESULTS}/logs/evaluate/{{dataset}}/{{method}}/{{protocol}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{dataset}}/{{method}}/{{protocol}}.tsv"
    script:
        "../scripts/evaluate.py"
