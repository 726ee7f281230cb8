"""Built-in protocol adapters, installed as edgeos.protocols.*; each registers an entry point."""
