"""Child processes that never outlive their parent, even when it dies by kill -9 (Linux: the
kernel's parent-death signal). Used for `pipe:` commands (components.data.corpus) and for
`dvc repro` under `vqpipe run` (pipelines.lifecycle).

- `die_with_parent()`: this process gets SIGTERM when its parent dies.
- `guarded(cmd)`: the command line that runs `cmd` with that set before it starts:
  `python -m components.processes PARENT_PID CMD...`, which execs CMD. Setting it between fork
  and exec (`preexec_fn`) is unsafe in a threaded process; a tiny exec wrapper is not.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Get SIGTERM when the parent process dies (Linux; elsewhere nothing). `parent`: the pid it
    must be; when it is gone already, the signal is sent now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def guarded(cmd: list[str]) -> list[str]:
    """`cmd`, run so that it gets SIGTERM when this process dies (see the module doc)."""
    return [sys.executable, "-m", "components.processes", str(os.getpid()), *cmd]


if __name__ == "__main__":  # python -m components.processes PARENT_PID CMD [ARGS...]
    die_with_parent(int(sys.argv[1]))
    os.execvp(sys.argv[2], sys.argv[2:])
