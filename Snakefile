# snaketune: download -> clean -> split -> tokenizer -> tokenize -> train -> evaluate -> track
# (-> sweep, for the experiments a sweep expanded into).
# Entry only: config, validation, rule files, and the target list.

configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/clean.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/track.smk"
include: "workflow/rules/sweep.smk"


check_local_sources()
check_gpus()
say_how_training_continues()
plan_training_memory()
restore_links()


rule all:
    input:
        get_final_outputs(),
    default_target: True


onstart:
    check_cuda_here()
    record_invocation()


onsuccess:
    print_summary()


onerror:
    print_failures()
