"""Dataset formats, validation, and the small language tasks shipped with palate."""
