rule prepare_tokenizer:
    input:
        train=shared("split", rules.split_corpus.output.train),
    output:
        **outputs("prepare_tokenizer", f"{SHARED}/tokenizer/{{data}}"),
    params:
        settings=settings_for("prepare_tokenizer"),
        sources=sources_for("prepare_tokenizer"),
        tracking=shared_tracking("tokenizer"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{SHARED}/tokenizer/{{data}}/tokenizer.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        shell_command("prepare_tokenizer", env="RAYON_NUM_THREADS={threads}")
