rule clean_corpus:
    input:
        raw=get_raw_dir,
    output:
        **outputs(
            "clean_corpus",
            f"{SHARED}/clean/{{data}}",
            report_html=dict(
                caption="../report/clean_report.rst",
                category="Data",
                labels={"data": "{data}", "file": "cleaning report"},
            ),
        ),
    params:
        settings=settings_for("clean_corpus"),
        sources=sources_for("clean_corpus"),
        tracking=shared_tracking("clean"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{SHARED}/clean/{{data}}/clean.log",
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        shell_command("clean_corpus")
