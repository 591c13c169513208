# Mirrors results into MLflow. It only reads results/, so an MLflow outage fails this rule alone
# and the next snakemake run uploads what is missing. It also logs the trained model (loading
# its weights to build a transformers pipeline) and registers a version of it.
rule track_experiment:
    input:
        download=get_download_manifest,
        clean=rules.clean_corpus.output.manifest,
        clean_report=rules.clean_corpus.output.report,
        split=rules.split_corpus.output.manifest,
        tokenizer=rules.prepare_tokenizer.output.manifest,
        tokenizer_dir=rules.prepare_tokenizer.output.tokenizer,
        tokenize=rules.tokenize_shards.output.manifest,
        train=rules.train_model.output.manifest,
        history=rules.train_model.output.history,
        system_metrics=rules.train_model.output.system_metrics,
        loss_curve=rules.train_model.output.loss_curve,
        model=rules.train_model.output.model,
        evaluate=rules.evaluate_model.output.manifest,
        metrics=rules.evaluate_model.output.metrics,
        samples=rules.evaluate_model.output.samples,
        eval_plot=rules.evaluate_model.output.plot,
    output:
        runs=f"{R}/{{experiment}}/track/runs.json",
    params:
        settings=get_track_settings,
    conda:
        "../../envs/track.yaml"
    log:
        f"{R}/{{experiment}}/track/track.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "snaketune track --settings {params.settings:q} --runs {output.runs:q}"
        " --history {input.history:q} --metrics {input.metrics:q}"
        " --model {input.model:q} --system-metrics {input.system_metrics:q}"
        " --stage download {input.download:q}"
        " --stage clean {input.clean:q} {input.clean_report:q}"
        " --stage split {input.split:q}"
        " --stage tokenizer {input.tokenizer:q} {input.tokenizer_dir:q}"
        " --stage tokenize {input.tokenize:q}"
        " --stage train {input.train:q} {input.history:q} {input.loss_curve:q}"
        " {input.system_metrics:q} {input.model:q}"
        " --stage evaluate {input.evaluate:q} {input.metrics:q} {input.samples:q}"
        " {input.eval_plot:q}"
        " > {log:q} 2>&1"
