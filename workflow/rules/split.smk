rule split_corpus:
    input:
        corpus=shared("clean", rules.clean_corpus.output.corpus),
    output:
        **outputs("split_corpus", f"{SHARED}/split/{{data}}"),
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
