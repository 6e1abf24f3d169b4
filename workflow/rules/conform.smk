# Step 1: validate and conform every input scan (a lossless reorientation; nothing is resampled).

# The settings of conform_scan that rule conform (and preprocess_scan) passes on.
CONFORM_CHECKS = ("orientation", "volume_index", "min_voxel_mm", "max_voxel_mm", "max_anisotropy")


rule derivatives_description:
    output:
        f"{DERIV}/dataset_description.json",
    log:
        f"{LOGS}/derivatives_description.log",
    params:
        datasets=[d["name"] for d in config["datasets"]],
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/derivatives_description.py"


if not ONE_JOB_PER_SCAN:

    rule conform:
        input:
            t1w=scan_input,
        output:
            image=SCAN_FILES["conformed"],
            sidecar=SCAN_FILES["conform_sidecar"],
        log:
            f"{LOGS}/conform/{{scan}}.log",
        benchmark:
            f"{BENCHMARKS}/conform/{{scan}}.tsv",
        params:
            **{key: config["conform"][key] for key in CONFORM_CHECKS},
            source_uri=scan_source_uri,
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        group:
            "preprocess"
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/conform.py"
