"""The LMI contract: configuration, request parsing, output formats. Importable without torch."""
