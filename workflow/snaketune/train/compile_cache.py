"""torch.compile's graphs, kept on disk for the next job of the same shape.

Inductor caches each compiled graph (its FX graph cache) and each joint forward-backward graph
(AOTAutograd's cache) in the folder TORCHINDUCTOR_CACHE_DIR names, by default a folder of the
machine's /tmp: a node of a cluster does not see another's, and /tmp is emptied. The workflow
points it at `<results_dir>/shared/compile_cache` for its jobs (a TORCHINDUCTOR_CACHE_DIR the
user set wins), so the train and evaluate jobs of a workflow, and the points of a sweep, compile
a shape once and load it after. A job that compiles records in its manifest where the cache was
and how many graphs it found there (hits) or compiled and stored (misses).
"""

from __future__ import annotations

from pathlib import Path

from snaketune.names import SHARED_FOLDER

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"
FOLDER = "compile_cache"


def workflow_folder(results_dir: str | Path) -> Path:
    """The cache the workflow's jobs share, under its results folder."""
    return Path(results_dir).resolve() / SHARED_FOLDER / FOLDER


def usage() -> dict:
    """Where this process's compiled graphs were cached, and how many it found there (hits)
    or compiled and stored (misses), by cache."""
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    fx_graph, aot_autograd = counters["inductor"], counters["aot_autograd"]
    return {
        "folder": cache_dir(),
        "fx_graph": {
            "hits": fx_graph["fxgraph_cache_hit"],
            "misses": fx_graph["fxgraph_cache_miss"],
        },
        "aot_autograd": {
            "hits": aot_autograd["autograd_cache_hit"],
            "misses": aot_autograd["autograd_cache_miss"],
        },
    }
