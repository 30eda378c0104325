"""MARS inside vLLM V1: the `--scheduler-cls` plug-in (`scheduler.py`) and its vLLM-free adapter."""
