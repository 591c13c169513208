# Mirrors results into MLflow. It only reads results/, so an MLflow outage fails this rule alone
# and the next snakemake run uploads what is missing. Each stage's manifest says where its
# outputs are, and its job definition which of them are artifacts. It also logs the trained
# model (loading its weights to build a transformers pipeline) and registers a version of it.
rule track_experiment:
    input:
        download=get_download_manifest,
        clean=rules.clean_corpus.output.manifest,
        split=rules.split_corpus.output.manifest,
        tokenizer=rules.prepare_tokenizer.output.manifest,
        tokenize=rules.gather_shards.output.manifest,
        train=rules.train_model.output.manifest,
        evaluate=rules.evaluate_model.output.manifest,
    output:
        runs=f"{R}/{{experiment}}/track/runs.json",
    params:
        settings=settings_for("track_experiment"),
        store=MLFLOW_STORE,
        artifacts=f"{R}/mlartifacts",
        provenance=f"{R}/provenance.json",
    conda:
        "../../envs/track.yaml"
    log:
        f"{R}/{{experiment}}/track/track.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        shell_command("track_experiment")
