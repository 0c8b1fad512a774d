"""Preference evaluation: the report, the plot, and scoring on a served model."""
