"""Runs `python -m study` command lines for tests, each in its own freshly forked process.

Started once (tests/test_bad_input.py): it imports the CLI and what its parsers need, then for every JSON
request on stdin ({"args", "cwd", "env", "stdout", "stderr"}) forks a child that runs the command exactly
as `python -m study` would (its own signal handlers, logging setup, environment and exit code), with stdout
and stderr going to the named files, and answers {"code": exit code} on stdout. A command line costs a
fork instead of a Python start with its imports: dozens of bad inputs in a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback


def serve() -> None:
    import mlflow  # noqa: F401  (imported once here, not in every child that needs it)

    import study  # noqa: F401  (chooses the Keras backend)
    import study.objective  # noqa: F401  (the optimize parser's validators)
    from study.cli import main

    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # A case that wrongly passes validation would train for real: stop it (and any worker it
                # started, in its process group) after `timeout` seconds.
                os.setpgid(0, 0)
                signal.signal(signal.SIGALRM, lambda signum, frame: os.killpg(0, signal.SIGKILL))
                signal.alarm(request.get("timeout", 60))
                os.chdir(request["cwd"])
                os.environ.update(request["env"])
                for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                    file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(file, fd)
                    os.close(file)
                try:
                    code = main(request["args"])
                except SystemExit as exit_request:
                    code = exit_request.code if isinstance(exit_request.code, int) else 1
                except BaseException:  # what `python -m study` would print: a traceback, exit code 1
                    traceback.print_exc()
                    code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
