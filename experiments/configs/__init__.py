"""Experiment configs: ``python -m experiments.train --config=experiments/configs/<task>.py[:<arg>]``."""
