"""Scaling laws (paper section 4.3): points table, frontiers, fits, allocation, plots, the fit job and the grid.

points -> frontier -> fits / allocation -> report (fit.json) -> plots; job wires them to files and MLflow.
"""
