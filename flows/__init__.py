"""Prefect flows and the `vqpipe` command line."""
