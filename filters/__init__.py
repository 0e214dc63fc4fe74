"""Scorers and the per-task policies that turn stored scores into accept/reject decisions."""
