"""Shared plumbing: the configuration object and crash-safe run files."""
