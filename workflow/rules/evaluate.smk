rule evaluate_model:
    input:
        model=rules.train_model.output.model,
        shards=shared("tokenize", rules.gather_shards.output.shards),
        tokenize_manifest=shared("tokenize", rules.gather_shards.output.manifest),
        train=shared("split", rules.split_corpus.output.train),
        test=shared("split", rules.split_corpus.output.test),
    output:
        **outputs(
            "evaluate_model",
            f"{R}/{{experiment}}/evaluate",
            plot=dict(
                caption="../report/eval_plot.rst",
                category="Evaluation",
                labels={"experiment": "{experiment}", "file": "plot"},
            ),
            metrics_html=dict(
                caption="../report/metrics.rst",
                category="Evaluation",
                labels={"experiment": "{experiment}", "file": "metrics"},
            ),
            samples_html=dict(
                caption="../report/samples.rst",
                category="Evaluation",
                labels={"experiment": "{experiment}", "file": "samples"},
            ),
        ),
    params:
        settings=settings_for("evaluate_model"),
        tracking=TRACKING,
    conda:
        "../../envs/train.yaml"
    log:
        f"{R}/{{experiment}}/evaluate/evaluate.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        shell_command("evaluate_model", env="OMP_NUM_THREADS={threads}")
