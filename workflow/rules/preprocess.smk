# Steps 2-7 per scan: N4 -> level-1 affine -> skull-strip -> level-2 affine -> one resampling +
# normalisation on the training grid. Per-scan jobs share the group "preprocess", so a cluster runs a
# scan's chain as one submission (and --group-components bundles several scans).
# With preprocess.one_job_per_scan, rule preprocess_scan (end of this file) replaces these rules and
# rules conform and qc_scan: same files, one job per scan.

# deepbet on a GPU only when declared (preprocess.skullstrip.device: cuda): then its jobs ask for one.
SKULLSTRIP_GPUS = int(config["preprocess"]["skullstrip"]["device"] == "cuda"
                      and config["preprocess"]["skullstrip"]["method"] == "deepbet")

if not ONE_JOB_PER_SCAN:

    rule n4:
        input:
            image=SCAN_FILES["conformed"],
        output:
            # Uncompressed: temporary, and gzip costs ~1.5 s a write for a float32 head.
            corrected=temp(f"{DERIV}/{{scan}}_desc-n4_T1w.nii"),
            biasfield=SCAN_FILES["biasfield"],
            headmask=SCAN_FILES["headmask"],
        log:
            f"{LOGS}/n4/{{scan}}.log",
        benchmark:
            f"{BENCHMARKS}/n4/{{scan}}.tsv",
        params:
            shrink_factor=config["preprocess"]["n4"]["shrink_factor"],
            iterations=config["preprocess"]["n4"]["iterations"],
            convergence=config["preprocess"]["n4"]["convergence"],
            bias_fwhm=config["preprocess"]["n4"]["bias_fwhm"],
        threads: PREP_THREADS
        resources:
            mem_mb=3000,
            runtime=15,
        group:
            "preprocess"
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/n4.py"


if not ONE_JOB_PER_SCAN:

    rule register_level1:
        input:
            corrected=rules.n4.output.corrected,
        output:
            xfm=SCAN_FILES["level1_xfm"],
            info=SCAN_FILES["level1_info"],
            head=temp(f"{DERIV}/{{scan}}_space-{MNI}_desc-level1_T1w.nii"),
        log:
            f"{LOGS}/register_level1/{{scan}}.log",
        benchmark:
            f"{BENCHMARKS}/register_level1/{{scan}}.tsv",
        threads: PREP_THREADS
        resources:
            mem_mb=3000,
            runtime=15,
        group:
            "preprocess"
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/register_level1.py"


if not ONE_JOB_PER_SCAN:

    rule skullstrip:
        input:
            head=rules.register_level1.output.head,
            level1=rules.register_level1.output.xfm,
            native=rules.n4.output.corrected,
        output:
            mask=SCAN_FILES["brain_mask"],
            info=SCAN_FILES["brain_mask_info"],
        log:
            f"{LOGS}/skullstrip/{{scan}}.log",
        benchmark:
            f"{BENCHMARKS}/skullstrip/{{scan}}.tsv",
        params:
            method=config["preprocess"]["skullstrip"]["method"],
            device=config["preprocess"]["skullstrip"]["device"],
        threads: PREP_THREADS
        resources:
            mem_mb=3000,
            runtime=15,
            gpu=SKULLSTRIP_GPUS,
        group:
            "preprocess"
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/skullstrip.py"


if not ONE_JOB_PER_SCAN:

    rule register_level2:
        input:
            corrected=rules.n4.output.corrected,
            mask=rules.skullstrip.output.mask,
            level1=rules.register_level1.output.xfm,
        output:
            xfm=SCAN_FILES["xfm"],
            info=SCAN_FILES["xfm_info"],
        log:
            f"{LOGS}/register_level2/{{scan}}.log",
        benchmark:
            f"{BENCHMARKS}/register_level2/{{scan}}.tsv",
        threads: PREP_THREADS
        resources:
            mem_mb=3000,
            runtime=15,
        group:
            "preprocess"
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/register_level2.py"


if not ONE_JOB_PER_SCAN:

    rule resample:
        input:
            image=rules.conform.output.image,
            biasfield=rules.n4.output.biasfield,
            mask=rules.skullstrip.output.mask,
            xfm=rules.register_level2.output.xfm,
        output:
            image=SCAN_FILES["preproc"],
            mask=SCAN_FILES["preproc_mask"],
        log:
            f"{LOGS}/resample/{{scan}}.log",
        benchmark:
            f"{BENCHMARKS}/resample/{{scan}}.tsv",
        params:
            grid=GRID,
            order=config["preprocess"]["interpolation_order"],
            normalisation=config["preprocess"]["normalisation"],
        threads: PREP_THREADS
        resources:
            mem_mb=3000,
            runtime=10,
        group:
            "preprocess"
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/resample.py"


if ONE_JOB_PER_SCAN:

    rule preprocess_scan:
        input:
            t1w=scan_input,
        output:
            **{name: path for name, path in SCAN_FILES.items() if name != "qc_png"},
            qc_png=report(SCAN_FILES["qc_png"], **QC_PICTURE_REPORT),
        log:
            f"{LOGS}/preprocess_scan/{{scan}}.log",
        benchmark:
            f"{BENCHMARKS}/preprocess_scan/{{scan}}.tsv",
        params:
            conform=lambda wildcards: {
                **{key: config["conform"][key] for key in CONFORM_CHECKS},
                "source_uri": scan_source_uri(wildcards),
            },
            n4=config["preprocess"]["n4"],
            skullstrip_method=config["preprocess"]["skullstrip"]["method"],
            skullstrip_device=config["preprocess"]["skullstrip"]["device"],
            grid=GRID,
            order=config["preprocess"]["interpolation_order"],
            normalisation=config["preprocess"]["normalisation"],
            qc_thresholds=config["qc"]["thresholds"],
            scan_key=scan_key,
        threads: PREP_THREADS
        resources:
            mem_mb=3000,
            runtime=60,
            gpu=SKULLSTRIP_GPUS,
        group:
            "preprocess"
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/preprocess_scan.py"


if TEMPLATE_SCANS:

    # Scans of datasets declared to be in a template space (datasets[].space): validated, masked by their
    # non-zero support, resampled once onto the grid and normalised; identity transforms (brainvae.steps).
    rule preprocess_template_scan:
        input:
            t1w=scan_input,
        output:
            **{name: path for name, path in SCAN_FILES.items() if name != "qc_png"},
            qc_png=report(SCAN_FILES["qc_png"], **QC_PICTURE_REPORT),
        wildcard_constraints:
            scan=TEMPLATE_SCAN_WILDCARD,
        log:
            f"{LOGS}/preprocess_template_scan/{{scan}}.log",
        benchmark:
            f"{BENCHMARKS}/preprocess_template_scan/{{scan}}.tsv",
        params:
            conform=lambda wildcards: {
                **{key: config["conform"][key] for key in CONFORM_CHECKS},
                "source_uri": scan_source_uri(wildcards),
            },
            space=lambda wildcards: TEMPLATE_SPACE_OF[SAMPLE_ROWS[wildcards.scan]["dataset"]],
            grid=GRID,
            order=config["preprocess"]["interpolation_order"],
            normalisation=config["preprocess"]["normalisation"],
            qc_thresholds=config["qc"]["thresholds"],
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
            "../scripts/preprocess_template_scan.py"
