"""Runs a snippet on 8 simulated CPU devices in a fresh process.

XLA_FLAGS must be set before jax is imported, so multi-device checks cannot
run inside the (single-device) pytest process.
"""
import concurrent.futures
import os
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(snippet: str, tmp_path, devices: int = 8) -> dict:
    """Executes `snippet`, which must fill a dict `out` of arrays; returns it."""
    out_file = os.path.join(str(tmp_path), "out.npz")
    code = ("import numpy as np\nout = {}\n" + textwrap.dedent(snippet)
            + f"\nnp.savez({out_file!r}, **{{k: np.asarray(v) for k, v in out.items()}})\n")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise AssertionError(f"subprocess failed:\n{proc.stdout}\n{proc.stderr}")
    return dict(np.load(out_file))


def run_one_and_eight(snippet: str, tmp_path_factory) -> tuple[dict, dict]:
    """`run` on 1 and on 8 devices at once: each process is mostly single-threaded
    compilation, so the two overlap on two cores."""
    dirs = [tmp_path_factory.mktemp(name) for name in ("one", "eight")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, snippet, d, n) for d, n in zip(dirs, (1, 8))]
        return futures[0].result(), futures[1].result()
