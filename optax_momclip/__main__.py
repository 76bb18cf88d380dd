"""`python -m optax_momclip demo|bench`: the application in `optax_momclip.cli`."""

if __name__ == "__main__":
  from optax_momclip.cli import run

  run()
