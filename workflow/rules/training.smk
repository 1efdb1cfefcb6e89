# Step 3: pretrained and meta-trained embeddings, then descriptors of every image.


rule cache_backbone_features:
    input:
        manifest,
    output:
        f"{RESULTS}/{{dataset}}/features/backbone.npy",
    params:
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
        settings=settings("{dataset}.backbone", "device"),
    threads: THREADS
    log:
        f"{RESULTS}/logs/cache_backbone_features/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cache_backbone_features/{{dataset}}.tsv"
    script:
        "../scripts/cache_backbone_features.py"


rule pretrain:
    input:
        manifest=manifest,
        features=backbone_features,
    output:
        f"{RESULTS}/{{dataset}}/models/pretrained.pt",
    params:
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
        settings=settings("{dataset}.embedding", "{dataset}.pretraining", "{dataset}.backbone", "seed", "device"),
    threads: THREADS
    log:
        f"{RESULTS}/logs/pretrain/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{dataset}}.tsv"
    script:
        "../scripts/pretrain.py"


rule meta_train:
    input:
        manifest=manifest,
        pretrained=f"{RESULTS}/{{dataset}}/models/pretrained.pt",
        features=backbone_features,
    output:
        model=f"{RESULTS}/{{dataset}}/models/{{variant}}.pt",
        history=f"{RESULTS}/{{dataset}}/models/{{variant}}_history.csv",
    params:
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
        settings=settings(
            "{dataset}.meta_training",
            "meta_trained.{variant}",
            lambda wildcards: uses_mixture(wildcards.variant),
            "seed",
            "device",
        ),
    threads: THREADS
    log:
        f"{RESULTS}/logs/meta_train/{{dataset}}/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/meta_train/{{dataset}}/{{variant}}.tsv"
    script:
        "../scripts/meta_train.py"


rule descriptors:
    input:
        manifest=manifest,
        model=f"{RESULTS}/{{dataset}}/models/{{embedding}}.pt",
        features=backbone_features,
    output:
        f"{RESULTS}/{{dataset}}/descriptors/{{embedding}}.npy",
    params:
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
    threads: THREADS
    log:
        f"{RESULTS}/logs/descriptors/{{dataset}}/{{embedding}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/descriptors/{{dataset}}/{{embedding}}.tsv"
    script:
        "../scripts/descriptors.py"
