"""The training command an export prints runs as printed: open_clip's own trainer
(``open_clip_train.main``, shipped in the open_clip_torch wheel) trains on the export.

The printed command is taken from ``dfn-curate export``'s output verbatim; the test only adds
what makes it small (the bundled tiny architecture, CPU, one epoch of a few steps)."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from etl.config import PROJECT_ROOT
from tests.helpers.pipeline import notebook_run

pytestmark = pytest.mark.slow

# open_clip_train.main with the bundled tiny architecture registered (a config by file path)
TRAINER = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
           "from open_clip_train.main import main; main(sys.argv[1:])")
SMALL = ["--model", "dfn-tiny", "--device", "cpu", "--precision", "fp32", "--batch-size", "8",
         "--epochs", "1", "--workers", "0", "--warmup", "1", "--lr", "1e-4",
         "--save-frequency", "1", "--log-every-n-steps", "1", "--report-to", ""]


def printed_command(stdout: str) -> list[str]:
    """The ``export: train with: ...`` line of the export's output, as argv."""
    lines = [line for line in stdout.splitlines() if line.startswith("export: train with: ")]
    assert len(lines) == 1, stdout[-2000:]
    return shlex.split(lines[0][len("export: train with: "):])


def test_printed_open_clip_command_trains_on_the_export(tmp_path_factory, capsys):
    run = notebook_run(tmp_path_factory)
    from etl import steps

    capsys.readouterr()
    args = [a for o in run.overrides for a in ("--set", o)]
    steps.main("export", [*args, "--run-id", "for-open-clip"])
    argv = printed_command(capsys.readouterr().out)
    assert argv[:3] == ["python", "-m", "open_clip_train.main"]
    logs = tmp_path_factory.mktemp("open-clip-logs")
    cmd = [sys.executable, "-c", TRAINER, str(PROJECT_ROOT / "conf/models/dfn-tiny.json"),
           *argv[3:], *SMALL, "--logs", str(logs), "--name", "tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path_factory
                          .getbasetemp())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    checkpoints = list((logs / "tiny" / "checkpoints").glob("epoch_1.pt"))
    assert checkpoints, (proc.stdout + proc.stderr)[-3000:]
    log = (logs / "tiny" / "out.log").read_text()
    assert "Train Epoch: 0" in log and "Loss" in log
