"""What the tests share besides fixtures: prepared stage data, workflow runs, MLflow stores,
servers and processes. Fixtures live in the conftest.py files; test modules import from here,
never from one another."""
