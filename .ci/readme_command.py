"""Print one of the README's fresh-machine commands: `main` (quick start) or `tests`.

CI and the tests take the commands from the README itself, so the README cannot drift from
what is run.
"""

import re
import sys
from pathlib import Path

SECTIONS = {"main": "## Quick start", "tests": "## Run the tests"}


def readme_command(which: str, readme: Path = Path(__file__).resolve().parents[1] / "README.md"):
    text = readme.read_text()
    section = text.split(SECTIONS[which], 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    if len(blocks) != 1:
        raise SystemExit(f"README section {SECTIONS[which]!r} must hold one bash block")
    return blocks[0].strip()


if __name__ == "__main__":
    print(readme_command(sys.argv[1]))
