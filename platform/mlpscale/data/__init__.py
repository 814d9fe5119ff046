"""Datasets: source readers, the .beton writer, nested subsets, meta.json; see prepare.py for the entry point."""
