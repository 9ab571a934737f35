"""What the tests share that is not a fixture: configs, CLI runs and their TensorBoard scalars, fake servers, and
the test-only Lightning pieces that subprocess runs load by `_target_` (tests/ is on their PYTHONPATH)."""
