"""Sparkplug B: bmsd as a host application of industrial edge nodes (docs/sparkplug.md)."""
