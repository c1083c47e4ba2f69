"""The command line, a front end of :mod:`lookback_core`: ``python -m lookback_cli generate|info``
for any SD1.5 checkpoint and look-back weights, and ``demo`` / ``toyworld ...`` for the toy world
(:mod:`toyworld`). :mod:`lookback_cli.main` reads the flags and reports a bad input as one line."""
