rule download_dataset:
    output:
        **outputs("download_dataset", f"{R}/datasets/{{dataset}}/download"),
    params:
        settings=settings_for("download_dataset"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/datasets/{{dataset}}/download/download.log",
    resources:
        mem_mb=1000,
        runtime=60,
    shell:
        shell_command("download_dataset")
