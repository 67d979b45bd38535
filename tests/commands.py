"""`hiervec` commands run in the test's own process (click's runner): no second start-up of the torch
stack (about 8 s a process here). A command closes what it opened, Milvus Lite files included, so a
process started afterwards can open them. Tests whose subject is a process (killed, stopped, served)
start a real one instead, from `HIERVEC`."""

import json
import sys

from click.testing import CliRunner

from cli.main import cli

HIERVEC = [sys.executable, "-c", "from cli.main import main; main()"]  # a `hiervec` process's command line


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def run_json(*args):
    result = run(*args, "--json")
    return json.loads(result.stdout)
