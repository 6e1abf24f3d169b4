# Steps 2-7 per scan: N4 -> level-1 affine -> skull-strip -> level-2 affine -> one resampling +
# normalisation on the training grid. Per-scan jobs share the group "preprocess", so a cluster runs a
# scan's chain as one submission (and --group-components bundles several scans).

MNI = "MNI152NLin2009aSym"
GRID = config["preprocess"]["grid"]
PREP_THREADS = config["preprocess"]["threads"]


rule n4:
    input:
        image=f"{DERIV}/{{scan}}_desc-conform_T1w.nii.gz",
    output:
        # Uncompressed: temporary, and gzip costs ~1.5 s a write for a float32 head.
        corrected=temp(f"{DERIV}/{{scan}}_desc-n4_T1w.nii"),
        biasfield=f"{DERIV}/{{scan}}_desc-biasfield_T1w.nii.gz",
        headmask=f"{DERIV}/{{scan}}_desc-head_mask.nii.gz",
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


rule register_level1:
    input:
        corrected=rules.n4.output.corrected,
    output:
        xfm=f"{DERIV}/{{scan}}_from-T1w_to-{MNI}_mode-image_desc-level1_xfm.mat",
        info=f"{DERIV}/{{scan}}_from-T1w_to-{MNI}_mode-image_desc-level1_xfm.json",
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


rule skullstrip:
    input:
        head=rules.register_level1.output.head,
        level1=rules.register_level1.output.xfm,
        native=rules.n4.output.corrected,
    output:
        mask=f"{DERIV}/{{scan}}_desc-brain_mask.nii.gz",
        info=f"{DERIV}/{{scan}}_desc-brain_mask.json",
    log:
        f"{LOGS}/skullstrip/{{scan}}.log",
    benchmark:
        f"{BENCHMARKS}/skullstrip/{{scan}}.tsv",
    params:
        method=config["preprocess"]["skullstrip"]["method"],
    threads: PREP_THREADS
    resources:
        mem_mb=3000,
        runtime=15,
    group:
        "preprocess"
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/skullstrip.py"


rule register_level2:
    input:
        corrected=rules.n4.output.corrected,
        mask=rules.skullstrip.output.mask,
        level1=rules.register_level1.output.xfm,
    output:
        xfm=f"{DERIV}/{{scan}}_from-T1w_to-{MNI}_mode-image_xfm.mat",
        info=f"{DERIV}/{{scan}}_from-T1w_to-{MNI}_mode-image_xfm.json",
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


rule resample:
    input:
        image=rules.conform.output.image,
        biasfield=rules.n4.output.biasfield,
        mask=rules.skullstrip.output.mask,
        xfm=rules.register_level2.output.xfm,
    output:
        image=f"{DERIV}/{{scan}}_space-{MNI}_res-{GRID}_desc-preproc_T1w.nii.gz",
        mask=f"{DERIV}/{{scan}}_space-{MNI}_res-{GRID}_desc-brain_mask.nii.gz",
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
