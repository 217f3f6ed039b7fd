"""The official ImageCLEFmed concept-detection score."""
