"""Noise schedulers, one per file, sharing the β-schedule arithmetic in `schedule.py`."""
