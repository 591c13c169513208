rule clean_corpus:
    input:
        raw=get_raw_dir,
    output:
        corpus=f"{R}/{{experiment}}/clean/corpus.parquet",
        report=report(
            f"{R}/{{experiment}}/clean/report.json",
            caption="../report/clean_report.rst",
            category="Data",
            labels={"experiment": "{experiment}", "file": "cleaning report"},
        ),
        manifest=f"{R}/{{experiment}}/clean/manifest.json",
    params:
        settings=settings_for("clean_corpus"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/{{experiment}}/clean/clean.log",
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        shell_command("clean_corpus")
