"""m3t-stream platform: settings, service management, the CLI."""
