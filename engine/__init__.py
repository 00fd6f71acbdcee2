"""The engine: process model, configuration, the segment store and the CLI."""
