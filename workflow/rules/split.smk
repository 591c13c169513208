rule split_corpus:
    input:
        corpus=rules.clean_corpus.output.corpus,
    output:
        train=f"{R}/{{experiment}}/split/train.parquet",
        val=f"{R}/{{experiment}}/split/val.parquet",
        test=f"{R}/{{experiment}}/split/test.parquet",
        manifest=f"{R}/{{experiment}}/split/manifest.json",
    params:
        settings=get_split_settings,
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/{{experiment}}/split/split.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "snaketune split --corpus {input.corpus:q} --train {output.train:q}"
        " --val {output.val:q} --test {output.test:q} --manifest {output.manifest:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
