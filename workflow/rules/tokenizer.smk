rule prepare_tokenizer:
    input:
        train=rules.split_corpus.output.train,
    output:
        tokenizer=directory(f"{R}/{{experiment}}/tokenizer/tokenizer"),
        manifest=f"{R}/{{experiment}}/tokenizer/manifest.json",
    params:
        settings=get_tokenizer_settings,
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/{{experiment}}/tokenizer/tokenizer.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "RAYON_NUM_THREADS={threads} snaketune tokenizer --train {input.train:q}"
        " --out {output.tokenizer:q} --manifest {output.manifest:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
