"""Conventional recommendation baselines evaluated with the same splits and metric code."""
