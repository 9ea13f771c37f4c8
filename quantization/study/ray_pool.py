"""``kimia-edge study --ray ADDRESS``: the cells as Ray tasks on an existing cluster (``ray://host:10001`` or
``auto``), or on a Ray instance started here for the run (``local``).

A cell is independent and keyed by its file (run.compute_cell writes ``cells/<key>.json`` atomically), so a task is
just that call: each cell runs on one thread as in a serial run and gives the same numbers. The workers must see the
report folder (shared file system) and have kimia-edge installed with the build and study extras; the preparation
(graphs, GGUFs, references, bundles) runs here first, as for ``--jobs``.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

from kimia_edge.quantization.study.spec import Cell

__all__ = ["LOCAL", "run_cells"]

LOCAL = "local"


def run_cells(address: str, out: str, snapshot: str, cells: Sequence[Cell], cpus: int = 0) -> Iterator[str]:
    """Runs ``cells`` as Ray tasks (one CPU each) and yields each cell's key as it is stored. ``address``: a cluster
    address for ``ray.init``, or ``local`` for a Ray instance of ``cpus`` CPUs (0: every core) started and stopped
    here. Cancels the remaining tasks if the caller stops early (Ctrl-C, an error)."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'kimia-edge[study]' (or pip install ray)") from None
    from kimia_edge.quantization.study.run import compute_cell

    started = not ray.is_initialized()
    if started:
        if address == LOCAL:
            ray.init(num_cpus=cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    task = ray.remote(num_cpus=1, max_retries=0)(compute_cell)
    pending = [task.remote(out, snapshot, cell, True) for cell in cells]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
