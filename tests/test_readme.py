"""The README stays true: its Python blocks run, its commands and API table match the code."""

import re
from pathlib import Path

import optax_momclip as omc

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
  assert blocks
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})


def test_the_two_commands_come_first():
  first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
  assert 'pip install -e ".[examples]" && python -m optax_momclip demo' in first
  assert 'pip install -e ".[test]" && python -m pytest' in first


def test_api_table_lists_every_public_function():
  table = README.split("## API", 1)[1]
  for name in omc.__all__:
    if name[0].islower():
      assert f"`{name}(" in table, name
