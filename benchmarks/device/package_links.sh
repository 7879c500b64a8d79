# Run from the repository root. A checkout run from PYTHONPATH (not installed, as on the GPU machine) lacks the package
# mapping pyproject.toml gives an install: top-level eval/ and data/ as ctxaware.eval and ctxaware.data. Links them
# (git-ignored).
for sub in eval data; do ln -sfn ../$sub ctxaware/$sub; done  # -n: replace a link, never follow it
