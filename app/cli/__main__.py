"""`python -m app.cli` runs the `loraforge` command (how the tests and `up` start processes)."""

from app.cli.main import main

main()
