"""snaketune: the typed library that the Snakemake rules call, one module per stage."""

__version__ = "0.1.0"
