# Tokenize in three steps: a plan, one job per partition of a split's rows (side by side under
# --cores, each its own job on a cluster), and a gather that lays the partitions' shards out as
# one folder per split, which train and evaluate read. With tokenize.partitions: auto the number
# of partitions depends on the splits' sizes, so the plan is a checkpoint.
checkpoint plan_partitions:
    input:
        train=rules.split_corpus.output.train,
        val=rules.split_corpus.output.val,
        test=rules.split_corpus.output.test,
        tokenizer=rules.prepare_tokenizer.output.tokenizer,
    output:
        plan=f"{R}/{{experiment}}/tokenize/plan.json",
        encoder=f"{R}/{{experiment}}/tokenize/encoder.json",
    params:
        settings=get_tokenize_settings,
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/{{experiment}}/tokenize/plan.log",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "snaketune tokenize-plan --train {input.train:q} --val {input.val:q}"
        " --test {input.test:q} --tokenizer {input.tokenizer:q} --plan {output.plan:q}"
        " --encoder {output.encoder:q} --settings {params.settings:q} > {log:q} 2>&1"


# The shards are temporary: the gather hard-links them into tokenize/shards, after which these
# names are only a second way to reach the same files.
rule tokenize_partition:
    input:
        split=f"{R}/{{experiment}}/split/{{split}}.parquet",
        plan=rules.plan_partitions.output.plan,
        encoder=rules.plan_partitions.output.encoder,
    output:
        shards=temp(directory(f"{R}/{{experiment}}/tokenize/parts/{{split}}/{{part}}")),
        manifest=f"{R}/{{experiment}}/tokenize/parts/{{split}}/{{part}}.json",
    params:
        settings=get_partition_settings,
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/{{experiment}}/tokenize/parts/{{split}}/{{part}}.log",
    threads: 2
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "RAYON_NUM_THREADS={threads} snaketune tokenize-partition --split-file {input.split:q}"
        " --plan {input.plan:q} --encoder {input.encoder:q} --out {output.shards:q}"
        " --manifest {output.manifest:q} --settings {params.settings:q} > {log:q} 2>&1"


# --parts is the folder holding every tokenize_partition output above.
rule tokenize_shards:
    input:
        unpack(get_tokenize_partitions),
        train=rules.split_corpus.output.train,
        val=rules.split_corpus.output.val,
        test=rules.split_corpus.output.test,
        tokenizer=rules.prepare_tokenizer.output.tokenizer,
        plan=rules.plan_partitions.output.plan,
    output:
        shards=directory(f"{R}/{{experiment}}/tokenize/shards"),
        manifest=f"{R}/{{experiment}}/tokenize/manifest.json",
    params:
        settings=get_tokenize_settings,
        parts=get_tokenize_parts_dir,
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/{{experiment}}/tokenize/tokenize.log",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "snaketune tokenize-gather --train {input.train:q} --val {input.val:q}"
        " --test {input.test:q} --tokenizer {input.tokenizer:q} --plan {input.plan:q}"
        " --parts {params.parts:q} --out {output.shards:q} --manifest {output.manifest:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
