"""The Sudoku reference checkpoint: generator/checker (``grid``), splits (``data``), the
digit tokenizer, training recipes (``train``), solvers (``solve``), evaluation (``evaluate``)
and the ``dgserve`` subcommands (``cli.register``). The trained diffusion checkpoint ships in
``checkpoint/`` and is the local mode's default diffusion model."""
