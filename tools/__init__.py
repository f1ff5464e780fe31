"""Command-line tools beside the package; run them from the repository root as
`python -m tools.<name>` (e.g. `python -m tools.sweep --help`)."""
