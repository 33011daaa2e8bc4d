"""`python -m experiments.report`: the comparison report (`experiments.report.markdown.main`)."""

from experiments.report.markdown import main

main()
