rule split_corpus:
    input:
        corpus=shared("clean", rules.clean_corpus.output.corpus),
    output:
        train=f"{SHARED}/split/{{data}}/train.parquet",
        val=f"{SHARED}/split/{{data}}/val.parquet",
        test=f"{SHARED}/split/{{data}}/test.parquet",
        manifest=f"{SHARED}/split/{{data}}/manifest.json",
    params:
        settings=settings_for("split_corpus"),
        tracking=shared_tracking("split"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{SHARED}/split/{{data}}/split.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        shell_command("split_corpus")
