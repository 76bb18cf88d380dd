"""The public surface: __all__, docstrings with runnable examples, lint and types."""

import importlib.metadata
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import optax_momclip as omc

ROOT = Path(__file__).resolve().parents[1]


def test_all_is_sorted_unique_and_importable():
  assert omc.__all__ == sorted(omc.__all__)
  assert len(set(omc.__all__)) == len(omc.__all__)
  for name in omc.__all__:
    assert getattr(omc, name) is not None
  public = {n for n in vars(omc) if not n.startswith("_")} - {"annotations"}
  modules = {n for n in public if inspect.ismodule(getattr(omc, n))}
  assert public - modules == set(omc.__all__)


def test_init_holds_only_re_exports():
  source = (ROOT / "optax_momclip" / "__init__.py").read_text()
  body = [ln for ln in source.splitlines() if ln and not ln.startswith(("#", '"""', " ", "]"))]
  for line in body:
    assert line.startswith(("from optax_momclip._", "__version__", "__all__")), line
    if line.startswith("from "):
      name = line.split(" import ")[1].split(" as ")
      assert name[0] == name[1], line


@pytest.mark.parametrize("name", [n for n in omc.__all__ if n[0].islower()])
def test_every_public_function_has_a_docstring_with_an_example(name):
  doc = inspect.getdoc(getattr(omc, name))
  assert doc and "Examples:" in doc and ">>>" in doc, name
  assert "Args:" in doc and "Returns:" in doc, name


@pytest.mark.parametrize("name", [n for n in omc.__all__ if n[0].isupper()])
def test_every_state_documents_its_fields(name):
  cls = getattr(omc, name)
  doc = inspect.getdoc(cls)
  assert doc and "Attributes:" in doc
  for field in cls._fields:
    assert f"{field}:" in doc, (name, field)


def test_version_matches_pyproject_metadata():
  assert omc.__version__ == importlib.metadata.version("optax_momclip")


def _tool(name):
  path = shutil.which(name, path=str(Path(sys.executable).parent))
  if path is None:
    pytest.skip(f"{name} is not installed (it is in the test extra)")
  return path


def test_ruff_lint_and_format_are_clean():
  ruff = _tool("ruff")
  subprocess.run([ruff, "check", "."], cwd=ROOT, check=True, capture_output=True)
  subprocess.run([ruff, "format", "--check", "."], cwd=ROOT, check=True, capture_output=True)


def test_mypy_type_checks_the_package():
  mypy = _tool("mypy")
  out = subprocess.run(
    [mypy, "--no-error-summary", "optax_momclip"], cwd=ROOT, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stdout + out.stderr
