rule download_dataset:
    output:
        files=directory(f"{R}/datasets/{{dataset}}/download/files"),
        manifest=f"{R}/datasets/{{dataset}}/download/manifest.json",
    params:
        settings=get_download_settings,
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/datasets/{{dataset}}/download/download.log",
    resources:
        mem_mb=1000,
        runtime=60,
    shell:
        "snaketune download --out {output.files:q} --manifest {output.manifest:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
