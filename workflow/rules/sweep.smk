# A sweep's comparison: one table row and one plot point per experiment it expanded into
# (snaketune.track.sweep), after each point's track job, so that the table names their MLflow runs.
rule summarize_sweep:
    input:
        metrics=get_sweep_outputs(rules.evaluate_model.output.metrics),
        runs=get_sweep_outputs(rules.track_experiment.output.runs),
    output:
        **outputs(
            "summarize_sweep",
            f"{R}/sweeps/{{sweep}}",
            table_html=dict(
                caption="../report/sweep_table.rst",
                category="Sweeps",
                labels={"sweep": "{sweep}", "file": "comparison table"},
            ),
            plot=dict(
                caption="../report/sweep_plot.rst",
                category="Sweeps",
                labels={"sweep": "{sweep}", "file": "metrics against the swept keys"},
            ),
        ),
    params:
        settings=settings_for("summarize_sweep"),
        store=MLFLOW_STORE,
        artifacts=MLFLOW_ARTIFACTS,
        uploads_to=UPLOADS_TO,  # a rerun trigger only, as for the track rule
    conda:
        "../../envs/track.yaml"
    log:
        f"{R}/sweeps/{{sweep}}/sweep.log",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        shell_command("summarize_sweep")
