"""Stages: managed folders of a run that can be loaded from an earlier run, kept local, or reused."""
