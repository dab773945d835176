"""vitdeploy."""
