rule evaluate_model:
    input:
        model=rules.train_model.output.model,
        shards=rules.tokenize_shards.output.shards,
        tokenize_manifest=rules.tokenize_shards.output.manifest,
        train=rules.split_corpus.output.train,
        test=rules.split_corpus.output.test,
    output:
        metrics=report(
            f"{R}/{{experiment}}/evaluate/metrics.json",
            caption="../report/metrics.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "file": "metrics"},
        ),
        samples=f"{R}/{{experiment}}/evaluate/samples.jsonl",
        plot=report(
            f"{R}/{{experiment}}/evaluate/eval_plot.png",
            caption="../report/eval_plot.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "file": "plot"},
        ),
        manifest=f"{R}/{{experiment}}/evaluate/manifest.json",
    params:
        settings=get_evaluate_settings,
    conda:
        "../../envs/train.yaml"
    log:
        f"{R}/{{experiment}}/evaluate/evaluate.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "OMP_NUM_THREADS={threads} snaketune evaluate --model {input.model:q}"
        " --shards {input.shards:q} --tokenize-manifest {input.tokenize_manifest:q}"
        " --train {input.train:q} --test {input.test:q} --metrics {output.metrics:q}"
        " --samples {output.samples:q} --manifest {output.manifest:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
