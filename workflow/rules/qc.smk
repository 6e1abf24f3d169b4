# Quality control: a picture and metrics per scan, then one table with automatic flags and outliers.


if not ONE_JOB_PER_SCAN:

    rule qc_scan:
        input:
            image=rules.conform.output.image,
            biasfield=rules.n4.output.biasfield,
            mask=rules.skullstrip.output.mask,
            xfm=rules.register_level2.output.xfm,
            level1=rules.register_level1.output.info,
            level2=rules.register_level2.output.info,
            strip_info=rules.skullstrip.output.info,
        output:
            png=report(SCAN_FILES["qc_png"], **QC_PICTURE_REPORT),
            metrics=SCAN_FILES["qc_metrics"],
        log:
            f"{LOGS}/qc_scan/{{scan}}.log",
        benchmark:
            f"{BENCHMARKS}/qc_scan/{{scan}}.tsv",
        params:
            thresholds=config["qc"]["thresholds"],
            scan_key=scan_key,
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        group:
            "preprocess"
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/qc_scan.py"


rule qc_table:
    input:
        metrics=each_scan_file("qc_metrics", SAMPLES.index),
        # Scans left out because their input file failed validation: rows with their reason.
        failed_inputs=FAILED_INPUTS_TSV,
    output:
        report(f"{OUT}/qc/qc.tsv", caption="../report/qc_table.rst", category="Quality control"),
    log:
        f"{LOGS}/qc_table.log",
    params:
        exclude=config["qc"]["exclude"],
        # Scan key -> dataset: cohort outliers are judged within each dataset (site).
        datasets=dict(zip(SAMPLES["scan_key"], SAMPLES["dataset"])),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/qc_table.py"
