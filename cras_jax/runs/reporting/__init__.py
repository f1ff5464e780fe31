"""Reporting: results over seeds, a sweep's plan, the report's inputs and curves, plots."""
