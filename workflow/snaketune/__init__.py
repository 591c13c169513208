"""snaketune: the typed library that the Snakemake rules call: a package per stage (data,
tokenize, train, evaluate, track) beside a small core (README, "Architecture")."""

__version__ = "0.1.0"
