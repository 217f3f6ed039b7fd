"""conceptclef: UMLS concept detection for radiology images (ImageCLEFmedical Caption).

The repository root is this package (see pyproject.toml): `conceptclef.router`, `conceptclef.ensemble`,
`conceptclef.concept_models`, ... Importing it loads nothing heavy.
"""

__version__ = "0.1.0"
