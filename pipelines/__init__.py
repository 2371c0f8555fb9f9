"""One module per DVC stage: `run(cfg, ...) -> Result` and a small `main()`."""
