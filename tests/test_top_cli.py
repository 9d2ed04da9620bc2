import subprocess
import sys

from palate.cli import main


def test_help_lists_layers_and_exits_zero():
    out = subprocess.run([sys.executable, "-m", "palate.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "palate" in out.stdout


def test_no_command_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out
