rule tokenize_shards:
    input:
        train=rules.split_corpus.output.train,
        val=rules.split_corpus.output.val,
        test=rules.split_corpus.output.test,
        tokenizer=rules.prepare_tokenizer.output.tokenizer,
    output:
        shards=directory(f"{R}/{{experiment}}/tokenize/shards"),
        manifest=f"{R}/{{experiment}}/tokenize/manifest.json",
    params:
        settings=get_tokenize_settings,
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/{{experiment}}/tokenize/tokenize.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "RAYON_NUM_THREADS={threads} snaketune tokenize --train {input.train:q}"
        " --val {input.val:q} --test {input.test:q} --tokenizer {input.tokenizer:q}"
        " --out {output.shards:q} --manifest {output.manifest:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
