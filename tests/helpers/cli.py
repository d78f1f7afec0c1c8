"""Console scripts run as a user runs them, without paying their ~8 s of imports each time.

A command-line test needs what a user's process has: the real console-script entry point, its own
argv, working directory, environment, stdout, stderr and exit code. What it does not need is a
fresh interpreter importing torch, Lightning, Hydra and torchvision again (about 8 s of a 2-core
CPU, the bulk of the fast suite's CLI tests). So a zygote process imports the package's entry
points once, with nothing else done, and forks one child per command; the child runs the command
as the console script would (`sys.exit(main())`: atexit handlers, then the streams flushed) and
its exit status comes back. Commands that start other processes from `sys.argv` (DDP launchers)
and the import of the package itself are tested with fresh interpreters (`fresh=True`).
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ZYGOTE = r"""
import atexit, json, os, signal, sys, time, traceback
from importlib.metadata import entry_points

sys.path[0] = os.path.dirname(sys.executable)  # a console script's own folder, not the cwd of `-c`

scripts = entry_points(group="console_scripts")
mains = {ep.name: ep.load() for ep in scripts if ep.value.startswith("transfer_cases")}
protocol_in, protocol_out = sys.stdin, os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing the zygote prints can reach the protocol

def run(request):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    streams = ((os.devnull, os.O_RDONLY), (request["out"], os.O_WRONLY), (request["err"], os.O_WRONLY))
    for fd, (path, flags) in enumerate(streams):
        os.dup2(os.open(path, flags), fd)
    sys.argv = request["argv"]
    try:
        code = mains[os.path.basename(sys.argv[0])]()
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code or 0

for line in protocol_in:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            protocol_out.close()
            code = run(request)
        finally:
            os._exit(code)
    deadline, timed_out = time.monotonic() + request["timeout"], False
    while not (status := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            status, timed_out = os.waitpid(pid, 0), True
            break
        time.sleep(0.01)
    returncode = os.waitstatus_to_exitcode(status[1])
    protocol_out.write(json.dumps({"returncode": returncode, "timed_out": timed_out}) + "\n")
"""


class Zygote:
    """A pre-imported interpreter that runs each console-script command in a forked child."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        atexit.register(self.close)

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()
            err.touch()
            request = {"argv": argv, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
            self.proc.stdin.write(json.dumps({**request, "timeout": timeout}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()  # answered when the child has ended (or was killed)
            if not line:
                raise RuntimeError(f"the CLI zygote exited (status {self.proc.wait()})")
            answer = json.loads(line)
            if answer["timed_out"]:
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(argv, answer["returncode"], out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_zygote: Zygote | None = None


def run_console_script(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float, fresh: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a `transfer-*` console script (`argv[0]` its full path) in a forked child of the zygote,
    or, with `fresh` or where fork is not the norm (not Linux), in a new interpreter."""
    global _zygote
    if fresh or sys.platform != "linux":
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = Zygote(env)
    return _zygote.run(argv, cwd, env, timeout)
