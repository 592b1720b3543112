"""Operating the server: daemons with PID files, status, cluster helpers (standard library only)."""
