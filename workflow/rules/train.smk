# Checkpoints go to train_state/, which is not an output: Snakemake deletes a failed job's
# outputs, and the checkpoint must survive so that a rerun resumes instead of starting over.
rule train_model:
    input:
        shards=shared("tokenize", rules.gather_shards.output.shards),
        tokenize_manifest=shared("tokenize", rules.gather_shards.output.manifest),
        tokenizer=shared("tokenizer", rules.prepare_tokenizer.output.tokenizer),
    output:
        **outputs(
            "train_model",
            f"{R}/{{experiment}}/train",
            loss_curve=dict(
                caption="../report/loss_curve.rst",
                category="Training",
                labels={"experiment": "{experiment}", "figure": "loss curve"},
            ),
        ),
    params:
        settings=settings_for("train_model"),
        sources=sources_for("train_model"),
        tracking=TRACKING,
        state_dir=f"{R}/{{experiment}}/train_state",
        launcher=get_train_launcher,
        threads_per_process=get_train_threads,
    conda:
        "../../envs/train.yaml"
    log:
        f"{R}/{{experiment}}/train/train.log",
    benchmark:
        f"{R}/{{experiment}}/train/benchmark.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
        # Not a limit: which attempt this is, so that a retry of an error it would repeat
        # stops at once (snaketune.train.attempts).
        attempt=lambda wildcards, attempt: attempt,
        # train.nodes > 1: N nodes under the SLURM profile, a task (a torchrun agent) on each.
        nodes=train_shape("nodes"),
        tasks=train_shape("tasks"),
        tasks_per_gpu=train_shape("tasks_per_gpu"),
        mpi=train_shape("mpi"),
    shell:
        shell_command(
            "train_model",
            # CUDA_VISIBLE_DEVICES: the job's own resources.gpu devices (snaketune.gpus).
            launcher=f"{INTERPRETER} -m snaketune.gpus {{resources.gpu}} -- {INTERPRETER} {{params.launcher}}",
            env=f"OMP_NUM_THREADS={{params.threads_per_process}} {ATTEMPT_VARIABLE}={{resources.attempt}}",
        )
