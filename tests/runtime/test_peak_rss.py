"""Peak memory as RunMetrics and the study's cells report it."""
import numpy as np


def test_a_child_process_reports_its_own_peak_rss_not_its_parents() -> None:
    """ru_maxrss survives fork + exec on Linux: a study cell's child (or a runtime started by a large process) must
    report its own peak, not its parent's size."""
    import subprocess
    import sys

    from kimia_edge.runtime.metrics import peak_rss_mib

    ballast = np.ones(400 << 17)  # 400 MiB touched in this (parent) process
    parent = peak_rss_mib()
    child = float(subprocess.run(
        [sys.executable, "-c", "from kimia_edge.runtime.metrics import peak_rss_mib; "
                               "print(peak_rss_mib())"], capture_output=True, text=True, check=True).stdout)
    assert ballast.sum() == 400 << 17 and parent > 400
    assert 0 < child < parent - 300
