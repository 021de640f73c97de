"""Datasets: the embedded synthetic demo dataset and dataset-record validation."""
