# The synthetic demo cohort with ground truth, generated when a dataset points inside demo.output_dir.

import os

from brainvae.workflow import demo_plan, demo_site_settings, demo_sites

DEMO_SITES = demo_sites(config)

if DEMO_SITES:
    DEMO_DIR = config["demo"]["output_dir"]
    DEMO_PLAN = demo_plan(config)

    rule demo_cohort:
        output:
            t1w=[f"{DEMO_DIR}/{entry['path']}" for entry in DEMO_PLAN],
            participants=[f"{DEMO_DIR}/{site}/participants.tsv" for site in DEMO_SITES],
        log:
            f"{LOGS}/demo_cohort.log",
        params:
            # <out_dir>/<site>/participants.tsv -> <out_dir>, derived from the outputs (no hard-coded prefix).
            out_dir=lambda wildcards, output: os.path.dirname(os.path.dirname(output.participants[0])),
            seed=config["demo"]["seed"],
            ds_strength=config["demo"]["ds_strength"],
            session_fraction=config["demo"]["session_fraction"],
            sites=demo_site_settings(config),
        # Snakemake caps this at --cores; reading workflow.cores would break --report and --lint.
        threads: 8
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../../envs/preprocess.yaml"
        script:
            "../scripts/demo_cohort.py"
