"""kdexp's analysis: run directories (kdexp's and the study's) -> tables, statistics, figures, report.
`analysis.collect.collect` reads runs into a frame; `python -m analysis` is the command line."""
