"""dgserve.operator: the kopf operator (installed under this name from the top-level ``operator/``).

The folder shares its name with the standard library's ``operator`` module. When the repository
root itself is on ``sys.path`` (``python -m ...`` or ``python -c ...`` run from the root of a fresh
virtual environment), ``import operator`` finds this folder instead of the standard library and
the interpreter cannot even start. The Makefile and CI run Python with ``-P`` for that reason; this
guard turns the otherwise cryptic failure into one that says what to do.
"""

if __name__ == "operator":
    raise ImportError(
        "the dgserve repository root is on sys.path, so its operator/ folder shadows the standard "
        "library's operator module; run Python with -P (python -P -m ...) or from another directory"
    )
