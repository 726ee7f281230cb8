"""The service layer: status for `edgeos status` (and later metrics, systemd notify)."""
