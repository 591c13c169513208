# Tokenize in three steps: a plan, one job per partition of a split's rows (side by side under
# --cores, each its own job on a cluster), and a gather that lays the partitions' shards out as
# one folder per split, which train and evaluate read. With tokenize.partitions: auto the number
# of partitions depends on the splits' sizes, so the plan is a checkpoint.
checkpoint plan_partitions:
    input:
        train=shared("split", rules.split_corpus.output.train),
        val=shared("split", rules.split_corpus.output.val),
        test=shared("split", rules.split_corpus.output.test),
        tokenizer=shared("tokenizer", rules.prepare_tokenizer.output.tokenizer),
    output:
        **outputs("plan_partitions", f"{SHARED}/tokenize/{{data}}"),
    params:
        settings=settings_for("plan_partitions"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{SHARED}/tokenize/{{data}}/plan.log",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        shell_command("plan_partitions")


# The shards are temporary: the gather hard-links them into tokenize/shards, after which these
# names are only a second way to reach the same files.
rule tokenize_partition:
    input:
        split_file=get_split_file,
        plan=rules.plan_partitions.output.plan,
        encoder=rules.plan_partitions.output.encoder,
    output:
        **outputs(
            "tokenize_partition",
            f"{SHARED}/tokenize/{{data}}/parts/{{split}}",
            temporary=("shards",),
        ),
    params:
        settings=settings_for("tokenize_partition"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{SHARED}/tokenize/{{data}}/parts/{{split}}/{{part}}.log",
    threads: lambda wildcards: partition_threads(wildcards.split)
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        shell_command("tokenize_partition", env="RAYON_NUM_THREADS={threads}")


rule gather_shards:
    input:
        part_shards=get_part_shards,
        part_manifests=get_part_manifests,
        train=shared("split", rules.split_corpus.output.train),
        val=shared("split", rules.split_corpus.output.val),
        test=shared("split", rules.split_corpus.output.test),
        tokenizer=shared("tokenizer", rules.prepare_tokenizer.output.tokenizer),
        plan=rules.plan_partitions.output.plan,
    output:
        **outputs("gather_shards", f"{SHARED}/tokenize/{{data}}"),
    params:
        settings=settings_for("gather_shards"),
        tracking=shared_tracking("tokenize"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{SHARED}/tokenize/{{data}}/tokenize.log",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        shell_command("gather_shards")
