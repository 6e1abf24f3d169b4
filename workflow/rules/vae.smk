# VAE: one training job per model variant (architecture dense or spatial), evaluation against PCA and
# mean-image baselines with latent diagnostics, Parquet latents. A variant's settings are the shared
# `training` section with `models[<name>]` on top; defaults come from brainvae.vae.config. Jobs ask for
# `training.gpus` GPUs per node (auto: 1 with device `cuda`, none otherwise; device `auto` uses a GPU if the
# node has one); training on several GPUs or nodes runs one DistributedDataParallel process per GPU.

from brainvae.errors import ConfigError
from brainvae.runtime import device_problems
from brainvae.vae.variants import (gpus_per_node, run_options, split_run_options, split_train_labels,
                                   training_processes, variant_settings)

MODELS = {
    name: variant_settings(config["training"], split_train_labels(overrides, None)[0])
    for name, overrides in config["models"].items()
}
# Per variant: the training config (what is trained, hashed into the model's provenance) and the run
# options (device, threads, deterministic: where and how it runs).
MODEL_CONFIG = {name: split_run_options(settings)[0] for name, settings in MODELS.items()}
MODEL_RUN = {name: run_options(settings) for name, settings in MODELS.items()}
# Settings that cannot run here (a perceptual term without local weights) were refused with the rest of the
# configuration (brainvae.config.validate_config).
MODEL_GPUS = {name: gpus_per_node(run) for name, run in MODEL_RUN.items()}
MODEL_PROCESSES = {name: training_processes(run) for name, run in MODEL_RUN.items()}


# A model that needs a GPU this machine lacks fails before the first job, not after preprocessing. Only where
# jobs run here: a SLURM login node has no GPU, its jobs' nodes do (and the job itself checks when it starts,
# brainvae.runtime.resolve_device). In onstart because the executor is known only once the run starts.
onstart:
    if workflow.local_exec and not workflow.remote_exec:
        _devices = {f"model {name} (training.device)": (run["device"], MODEL_GPUS[name])
                    for name, run in MODEL_RUN.items()}
        if SKULLSTRIP_GPUS:
            _devices["skull-stripping (preprocess.skullstrip.device)"] = ("cuda", 1)
        _problems = device_problems(_devices)
        if _problems:
            raise ConfigError("the configuration asks for GPUs this machine does not have:\n  "
                              + "\n  ".join(_problems))


wildcard_constraints:
    model="|".join(MODELS) or "(?!)",


rule train_vae:
    input:
        array=rules.cohort_array.output.array,
        mask=rules.cohort_array.output.mask,
        index=rules.cohort_array.output.index,
        splits=rules.cohort_splits.output[0],
    output:
        model=f"{OUT}/models/{{model}}/model.pt",
        # The scans this variant learns from, validates on and is tested on (its labels' part of the cohort splits).
        splits=f"{OUT}/models/{{model}}/splits.tsv",
        config=f"{OUT}/models/{{model}}/config.json",
        environment=f"{OUT}/models/{{model}}/environment.txt",
        metrics=f"{OUT}/models/{{model}}/metrics.json",
        log_tsv=f"{OUT}/models/{{model}}/training_log.tsv",
        curves=report(
            f"{OUT}/models/{{model}}/training_curves.png",
            caption="../report/training_curves.rst",
            category="VAE",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "training curves"},
        ),
    log:
        f"{LOGS}/train_vae/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/train_vae/{{model}}.tsv",
    params:
        config=lambda wildcards: MODEL_CONFIG[wildcards.model],
        train_labels=lambda wildcards: MODEL_TRAIN_LABELS[wildcards.model],
        device=lambda wildcards: MODEL_RUN[wildcards.model]["device"],
        deterministic=lambda wildcards: MODEL_RUN[wildcards.model]["deterministic"],
        # Outside the declared outputs: Snakemake deletes a failed job's outputs, the checkpoint
        # must survive that so a killed or timed-out job resumes from its last epoch.
        checkpoint_dir=lambda wildcards: f"{OUT}/.checkpoints/{wildcards.model}",
        # (processes per node, nodes): one process per GPU (brainvae.vae.variants.training_processes).
        processes=lambda wildcards: MODEL_PROCESSES[wildcards.model],
        threads_per_process=lambda wildcards: MODEL_RUN[wildcards.model]["threads"],
    # training.threads per process, for every process on the node.
    threads: lambda wildcards: MODEL_RUN[wildcards.model]["threads"] * MODEL_PROCESSES[wildcards.model][0]
    resources:
        mem_mb=lambda wildcards: 8000 * MODEL_PROCESSES[wildcards.model][0],
        runtime=240,
        # SLURM: --gpus=<all GPUs of the job>, --nodes, and training.threads CPUs per GPU; one task, which
        # starts the processes itself (torchrun, and srun across nodes).
        gpu=lambda wildcards: MODEL_GPUS[wildcards.model] * MODEL_PROCESSES[wildcards.model][1],
        nodes=lambda wildcards: MODEL_PROCESSES[wildcards.model][1],
        cpus_per_gpu=lambda wildcards: MODEL_RUN[wildcards.model]["threads"] if MODEL_GPUS[wildcards.model] else 0,
        tasks_per_gpu=0,
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/train_vae.py"


rule evaluate_vae:
    input:
        model=rules.train_vae.output.model,
        config=rules.train_vae.output.config,
        array=rules.cohort_array.output.array,
        mask=rules.cohort_array.output.mask,
        index=rules.cohort_array.output.index,
        splits=rules.train_vae.output.splits,
    output:
        per_scan=f"{OUT}/models/{{model}}/evaluation/per_scan_metrics.tsv",
        summary=report(
            f"{OUT}/models/{{model}}/evaluation/summary.tsv",
            caption="../report/evaluation_summary.rst",
            category="VAE",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "reconstruction metrics"},
        ),
        reconstructions=report(
            f"{OUT}/models/{{model}}/evaluation/reconstructions.png",
            caption="../report/reconstructions.rst",
            category="VAE",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "reconstructions"},
        ),
        prior_samples=report(
            f"{OUT}/models/{{model}}/evaluation/prior_samples.png",
            caption="../report/prior_samples.rst",
            category="VAE",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "samples from the prior"},
        ),
        # Active latent units, KL per dimension, posterior-collapse flag (brainvae.vae.diagnostics).
        diagnostics=report(
            f"{OUT}/models/{{model}}/evaluation/diagnostics.json",
            caption="../report/latent_diagnostics.rst",
            category="VAE",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "latent diagnostics"},
        ),
        kl_per_dimension=report(
            f"{OUT}/models/{{model}}/evaluation/kl_per_dimension.tsv",
            caption="../report/kl_per_dimension.rst",
            category="VAE",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "KL per latent dimension"},
        ),
    log:
        f"{LOGS}/evaluate_vae/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate_vae/{{model}}.tsv",
    params:
        device=lambda wildcards: MODEL_RUN[wildcards.model]["device"],
    threads: lambda wildcards: MODEL_RUN[wildcards.model]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=lambda wildcards: min(1, MODEL_GPUS[wildcards.model]),
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/evaluate_vae.py"


rule encode_latents:
    input:
        model=rules.train_vae.output.model,
        config=rules.train_vae.output.config,
        array=rules.cohort_array.output.array,
        mask=rules.cohort_array.output.mask,
        index=rules.cohort_array.output.index,
        splits=rules.train_vae.output.splits,
    output:
        f"{OUT}/latents/{{model}}.parquet",
    log:
        f"{LOGS}/encode_latents/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/encode_latents/{{model}}.tsv",
    params:
        device=lambda wildcards: MODEL_RUN[wildcards.model]["device"],
    threads: lambda wildcards: MODEL_RUN[wildcards.model]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=lambda wildcards: min(1, MODEL_GPUS[wildcards.model]),
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/encode_latents.py"


# Final outputs of this stage, requested by rule all.
VAE_TARGETS = [
    *expand(rules.evaluate_vae.output, model=MODELS),
    *expand(rules.encode_latents.output, model=MODELS),
]
