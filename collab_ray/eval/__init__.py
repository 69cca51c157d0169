"""Datasets and metrics used by the ensemble strategies, routers, cascades and the quality reports."""
