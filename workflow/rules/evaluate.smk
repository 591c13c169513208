rule evaluate_model:
    input:
        model=rules.train_model.output.model,
        shards=shared("tokenize", rules.gather_shards.output.shards),
        tokenize_manifest=shared("tokenize", rules.gather_shards.output.manifest),
        train=shared("split", rules.split_corpus.output.train),
        test=shared("split", rules.split_corpus.output.test),
    output:
        metrics=f"{R}/{{experiment}}/evaluate/metrics.json",
        samples=f"{R}/{{experiment}}/evaluate/samples.csv",
        plot=report(
            f"{R}/{{experiment}}/evaluate/eval_plot.png",
            caption="../report/eval_plot.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "file": "plot"},
        ),
        metrics_html=report(
            f"{R}/{{experiment}}/evaluate/metrics.html",
            caption="../report/metrics.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "file": "metrics"},
        ),
        samples_html=report(
            f"{R}/{{experiment}}/evaluate/samples.html",
            caption="../report/samples.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "file": "samples"},
        ),
        manifest=f"{R}/{{experiment}}/evaluate/manifest.json",
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
