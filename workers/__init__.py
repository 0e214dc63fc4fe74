"""Model adapters, one file per model family. No Ray in here: stages own the distribution."""
