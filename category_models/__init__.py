"""category_models package."""
