# The reconciler: makes MLflow agree with results/ after the stages logged live (snaketune.track.live),
# creating the runs they could not and uploading what never arrived, exactly once. It reads the
# results and writes only runs.json and the model card, so an MLflow outage fails this rule
# alone and the next snakemake run uploads what is missing. Each stage's manifest says where its
# outputs are, and its job definition which of them are artifacts. It also logs the trained
# model (loading its weights to build a transformers pipeline) and registers a version of it.
rule track_experiment:
    input:
        download=get_download_manifest,
        clean=shared("clean", rules.clean_corpus.output.manifest),
        split=shared("split", rules.split_corpus.output.manifest),
        tokenizer=shared("tokenizer", rules.prepare_tokenizer.output.manifest),
        tokenize=shared("tokenize", rules.gather_shards.output.manifest),
        train=rules.train_model.output.manifest,
        evaluate=rules.evaluate_model.output.manifest,
    output:
        **outputs("track_experiment", f"{R}/{{experiment}}/track"),
    params:
        settings=settings_for("track_experiment"),
        store=MLFLOW_STORE,
        artifacts=MLFLOW_ARTIFACTS,
        tracking=TRACKING,
        # A rerun trigger only: runs.json is complete for this store; another store (say
        # MLFLOW_TRACKING_URI pointed at a new server) needs its own upload.
        uploads_to=UPLOADS_TO,
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
