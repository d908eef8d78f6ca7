"""The trained Sudoku DiffusionGemma checkpoint (Hugging Face format), shipped as package data:
``dgserve.engine.sudoku.solve.default_checkpoint()`` is this folder."""
