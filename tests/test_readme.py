"""The README's two set-up commands exist, and CI runs the test command verbatim."""
import re

from tests.conftest import REPO


def _commands():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv[^\n]+)\n```", text)


def test_readme_has_exactly_two_setup_commands():
    cmds = _commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("culbot run full") and "torch==2.13.0" in cmds[0]
    assert cmds[1].endswith("python -m pytest") and cmds[0].index("torch==2.13.0") < cmds[0].index("-e .")


def test_ci_runs_the_readme_test_command():
    assert _commands()[1] in (REPO / ".ci" / "run").read_text().splitlines()


def test_fastapi_is_pinned_below_0_151():
    assert '"fastapi>=0.139,<0.151"' in (REPO / "pyproject.toml").read_text()
