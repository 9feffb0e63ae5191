"""Scripts run from the repository root (`python -m scripts.<module>`); a regular package, so that no installed
top-level `scripts` package can shadow it."""
