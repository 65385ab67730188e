"""`python -m bench.report [--quick]`: render the benchmark page (see __init__.py)."""

from bench.report import main

main()
