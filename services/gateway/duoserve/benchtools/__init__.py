"""Pieces of `duoserve bench`: request targets, the load generator, statistics and reports."""
