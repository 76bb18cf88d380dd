"""The library stays a library: the application beside it, small modules, short functions."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "optax_momclip"
LIBRARY = sorted(p for p in PACKAGE.glob("*.py"))
APPLICATION_ONLY = ("matplotlib", "sklearn", "tqdm", "flax", "torch")


def test_importing_the_library_imports_no_application_dependency():
  code = (
    f"import sys, optax_momclip; print(sorted(m for m in {APPLICATION_ONLY!r} if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
  code = (
    "import sys, optax_momclip; print(sorted(m for m in sys.modules if 'optax_momclip.cli' in m))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def _imports(path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{a.name}" for a in node.names)


def test_no_library_module_imports_the_application():
  for path in LIBRARY:
    if path.name == "__main__.py":  # the entry point hands over to it
      continue
    bad = [m for m in _imports(path) if m.startswith("optax_momclip.cli") or m in APPLICATION_ONLY]
    assert not bad, (path.name, bad)


def _function_lengths(path):
  """Each function's lines, its docstring left out."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      length = node.end_lineno - node.lineno + 1
      if ast.get_docstring(node) is not None:
        length -= node.body[0].end_lineno - node.body[0].lineno + 1
      yield node.name, length


def test_library_modules_and_functions_are_short():
  for path in LIBRARY:
    assert len(path.read_text().splitlines()) <= 420, path.name
    long = [(name, n) for name, n in _function_lengths(path) if n > 60]
    assert not long, (path.name, long)
