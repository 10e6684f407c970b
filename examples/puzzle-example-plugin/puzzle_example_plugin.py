"""An example third-party puzzle plugin (being written)."""
