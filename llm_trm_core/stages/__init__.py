"""Stage functions: `run_<stage>(cfg, store, ...) -> Manifest`, plain Python, no Prefect."""
