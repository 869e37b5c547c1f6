"""Command-line interface: the only place that parses strings into library objects."""
