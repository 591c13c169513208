"""Stage 5, tokenize: each split becomes Parquet shards of token ids, in three rules that each run
one module's entry (snaketune.stages lists them):

- plan_partitions (`plan.py`): cut each split into partitions of contiguous rows, read the label
  vocabulary, and save the exact Rust tokenizer every partition runs (`encoder.py`);
- tokenize_partition (`partition.py`), one job each: stream the partition's rows through the
  encoder, make rows of them (`packing.py`) and write bounded shards as it goes (`shards.py`);
- gather_shards (`gather.py`): link every partition's shards, in row order, into one folder per
  split and write the stage's manifest, which `shards.TokenizedData` reads back for training
  and evaluation.

`one_process.py` runs the three one after another in one process, for tests and benchmarks.
"""
