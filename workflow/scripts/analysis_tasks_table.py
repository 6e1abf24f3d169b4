"""Rule analysis_tasks_table: the tasks table of every model and baseline, and per task a table and a figure."""

from brainvae.workflow import job_logging

with job_logging(snakemake.log[0], snakemake.threads) as log:
    from brainvae.analysis.task_steps import tasks_tables

    i, o, p = snakemake.input, snakemake.output, snakemake.params
    paths = tasks_tables(i.results, i.predictions, p.tables_dir, dict(zip(p.tasks, o.figures, strict=True)),
                         dict(zip(p.tasks, o.task_tables, strict=True)))
    log.info("wrote %s", ", ".join(str(v) for v in paths.values()))
