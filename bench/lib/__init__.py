"""The pieces every benchmark shares (see bench/run.py for the layout)."""
