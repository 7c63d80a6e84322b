"""Tools for trying and measuring bmsd, not the daemon: nothing under bmsd/ingest imports them."""
