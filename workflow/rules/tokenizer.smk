rule prepare_tokenizer:
    input:
        train=rules.split_corpus.output.train,
    output:
        tokenizer=directory(f"{R}/{{experiment}}/tokenizer/tokenizer"),
        manifest=f"{R}/{{experiment}}/tokenizer/manifest.json",
    params:
        settings=settings_for("prepare_tokenizer"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/{{experiment}}/tokenizer/tokenizer.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        shell_command("prepare_tokenizer", env="RAYON_NUM_THREADS={threads}")
